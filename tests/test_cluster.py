"""Real clusters on loopback: a scheduler and workers started with the ``dask`` commands,
reached by address and by scheduler file; a worker killed mid-run; the whole cluster lost;
the dashboard answering during a run; the job scripts dask-jobqueue would submit (SLURM
jobs that run the pipeline: tests/test_slurm.py). ``busy_observation`` and ``busy_baseline``
are in conftest.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from coron_dask import run_coron3
from tests.conftest import assert_same_products, run_cli, start_cli
from tests.test_endings import no_product, stopped_line

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dask_command(*args: str) -> list[str]:
    return [str(BIN / "dask"), *args]


class LoopbackCluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, free ports."""

    def __init__(self, folder: Path, workers: int = 2) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = folder / "scheduler.json"
        self.processes = [
            subprocess.Popen(
                dask_command(
                    "scheduler",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--dashboard-address",
                    "127.0.0.1:0",
                    "--scheduler-file",
                    str(self.scheduler_file),
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        ]
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() or not self.scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        for _ in range(workers):
            self.processes.append(
                subprocess.Popen(
                    dask_command(
                        "worker",
                        "--scheduler-file",
                        str(self.scheduler_file),
                        "--nthreads",
                        "1",
                        "--memory-limit",
                        "1GiB",
                        "--host",
                        "127.0.0.1",
                        "--local-directory",
                        str(folder),
                    ),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        from distributed import Client

        with Client(self.address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(workers, timeout=60)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def loopback(tmp_path):
    """A cluster of the test's own (one the test stops)."""
    cluster = LoopbackCluster(tmp_path / "cluster")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def shared_loopback(tmp_path_factory):
    """A cluster the tests that keep it running share (a worker killed comes back: its
    nanny starts it again)."""
    cluster = LoopbackCluster(tmp_path_factory.mktemp("shared") / "cluster")
    yield cluster
    cluster.stop()


def test_scheduler_address_and_file(shared_loopback, busy_observation, busy_baseline, tmp_path):
    loopback = shared_loopback
    mask = busy_observation.parent / "psfmask.fits"
    by_address = run_cli(
        "run",
        busy_observation,
        "-o",
        tmp_path / "a",
        "--psfmask",
        mask,
        "--scheduler",
        loopback.address,
    )
    assert by_address.returncode == 0, by_address.stderr
    assert_same_products(tmp_path / "a", busy_baseline)
    by_file = run_cli(
        "run",
        busy_observation,
        "-o",
        tmp_path / "f",
        "--psfmask",
        mask,
        "--scheduler-file",
        loopback.scheduler_file,
    )
    assert by_file.returncode == 0, by_file.stderr
    assert_same_products(tmp_path / "f", busy_baseline)


def running_on(address: str, worker: str | None = None, prefix: str = "") -> None:
    """Wait until a task whose name starts with ``prefix`` runs (on ``worker``, if given) on
    the scheduler at ``address``: an event, not a number of seconds a busy machine may need."""
    from distributed import Client

    deadline = time.monotonic() + 300
    with Client(address, timeout=60, set_as_default=False) as client:
        while True:
            processing = client.processing()
            keys = [
                key
                for name in ([worker] if worker else processing)
                for key in processing.get(name, ())
            ]
            if any(str(key).lstrip("('").startswith(prefix) for key in keys):
                return
            assert time.monotonic() < deadline, "no task started"
            time.sleep(0.02)


def test_killed_worker_changes_nothing(shared_loopback, busy_observation, busy_baseline, tmp_path):
    loopback = shared_loopback
    out = tmp_path / "out"
    result: dict = {}

    def run() -> None:
        result["paths"] = run_coron3(
            busy_observation,
            out,
            psfmask=busy_observation.parent / "psfmask.fits",
            scheduler=loopback.address,
            integrations=1,
            progress=False,
            quiet=True,
            stats=tmp_path / "stats.json",
        )

    thread = threading.Thread(target=run)
    thread.start()
    from distributed import Client

    with Client(loopback.address, set_as_default=False) as client:
        pids = client.run(os.getpid)
    victim = sorted(pids)[0]
    running_on(loopback.address, victim, "AlignRefs-fit")  # the run is under way: fitting
    assert thread.is_alive(), "the run ended before a worker could be killed"
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(timeout=300)
    assert "paths" in result
    assert json.loads((tmp_path / "stats.json").read_text())["workers_lost"] >= 1
    assert_same_products(out, busy_baseline)


def test_lost_cluster_fails_cleanly_and_rerun_succeeds(
    loopback, busy_observation, busy_baseline, tmp_path
):
    out = tmp_path / "out"
    mask = busy_observation.parent / "psfmask.fits"
    process = start_cli(
        "run",
        busy_observation,
        "-o",
        out,
        "--psfmask",
        mask,
        "--scheduler",
        loopback.address,
        "--integrations-per-chunk",
        1,
    )
    running_on(loopback.address)
    assert process.poll() is None, "the run ended before the cluster could be lost"
    loopback.stop()
    _, err = process.communicate(timeout=180)
    assert process.returncode == 3, err
    assert "Traceback" not in err
    # what was written is kept for the same run again (this rerun's blocks differ: removed)
    stopped_line(err, "lost the connection to the scheduler", prefix="cluster: ")
    assert no_product(out)
    again = run_cli("run", busy_observation, "-o", out, "--psfmask", mask, "--n-workers", "2")
    assert again.returncode == 0, again.stderr
    assert_same_products(out, busy_baseline)


def test_dashboard_answers_during_a_run(busy_observation, tmp_path):
    process = start_cli(
        "run",
        busy_observation,
        "-o",
        tmp_path,
        "--psfmask",
        busy_observation.parent / "psfmask.fits",
        "--n-workers",
        2,
        "--integrations-per-chunk",
        1,
    )
    lines = [process.stderr.readline()]  # the log's lines first (how the cluster is sized)
    while not lines[-1].startswith("Dask dashboard") and lines[-1] and len(lines) < 20:
        lines.append(process.stderr.readline())
    line = lines[-1]
    assert line.startswith("Dask dashboard: http://127.0.0.1:"), lines
    url = line.split(": ", 1)[1].split()[0]  # then how to reach it through an ssh tunnel
    assert "ssh -L" in line
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        assert b"Dask" in response.read()
    assert process.wait(timeout=300) == 0
    assert len(list(tmp_path.glob("*.fits"))) == 14  # 7 crfints, psfstack, 2 + 2, i2d, snr


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("slurm", ["#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH -t 02:00:00"]),
        ("pbs", ["#PBS -l walltime=02:00:00", "#PBS -l select=1:ncpus=8:mem=32GB"]),
    ],
)
def test_job_scripts_come_from_the_site_yaml(kind, expected, tmp_path):
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(ROOT / "cluster" / "jobqueue.yaml", config)
    if kind == "pbs":  # the example leaves resource-spec to the site
        text = (config / "jobqueue.yaml").read_text()
        (config / "jobqueue.yaml").write_text(
            text.replace(
                'resource-spec: null        # e.g. "select=1:ncpus=8:mem=32GB"',
                'resource-spec: "select=1:ncpus=8:mem=32GB"',
            )
        )
    result = subprocess.run(
        [sys.executable, "-m", "coron_dask.cli", "cluster", kind],
        env={**os.environ, "DASK_CONFIG": str(config)},
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    for line in expected:
        assert line in result.stdout
    assert "--nthreads 1" in result.stdout and "--nworkers 8" in result.stdout
    assert "--memory-limit 4.00GiB" in result.stdout
    assert "--lifetime 110m --lifetime-stagger 5m" in result.stdout


def test_a_client_you_have_is_used_and_left_open(asn, observation_dir, tmp_path):
    """run_coron3(client=...): a notebook's own cluster runs the reduction, the same
    products as dask's synchronous scheduler, and both stay open afterwards."""
    from distributed import Client, LocalCluster

    psfmask = observation_dir / "psfmask.fits"
    baseline = tmp_path / "baseline"
    run_coron3(asn, baseline, psfmask=psfmask, scheduler="synchronous", progress=False)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        paths = run_coron3(asn, tmp_path / "out", psfmask=psfmask, client=client, progress=False)
        assert client.status == "running" and len(cluster.workers) == 1
        assert client.submit(sum, [1, 2]).result() == 3  # still usable
    assert_same_products(tmp_path / "out", baseline)
    assert len(paths) == len(list(baseline.iterdir()))


def test_the_python_api_runs_at_the_top_of_a_plain_script(asn, observation_dir, tmp_path):
    """No ``if __name__ == "__main__":``: the LocalCluster's worker processes do not run the
    script again (they would each start a cluster of their own)."""
    script = tmp_path / "reduce.py"
    script.write_text(
        "from coron_dask import run_coron3\n"
        f"paths = run_coron3({str(asn)!r}, {str(tmp_path / 'out')!r}, n_workers=1,\n"
        f"    psfmask={str(observation_dir / 'psfmask.fits')!r}, progress=False, quiet=True)\n"
        "print(len(paths), __file__)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Nanny failed to start" not in done.stderr
    count, name = done.stdout.split()
    assert int(count) == len(list((tmp_path / "out").iterdir())) > 10
    assert name == str(script)  # the script's own __file__ is back once the run ends
