"""The run waits for its workers before it plans blocks: the batch scripts in cluster/ run
with bash on this machine as their batch system would run them (a fake ``srun`` or
``pbsdsh`` starts the workers late), and a scheduler whose workers never come ends the run
with one line."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import psutil
import pytest

from coron_dask import run_coron3
from coron_dask.cli import main
from coron_dask.cluster import Cluster, _workers_to_await
from coron_dask.errors import ClusterError

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]  # not resolved: the virtualenv, not its base Python
LAUNCH_DELAY = 4  # seconds: coron-dask run is connected and waiting when workers start

#: srun as a job step: drops its own options and starts SLURM_NTASKS copies of the command
FAKE_SRUN = f"""#!/bin/bash
sleep {LAUNCH_DELAY}
while [[ $1 == -* ]]; do shift; done
for _ in $(seq "$SLURM_NTASKS"); do "$@" & done
wait
"""

#: pbsdsh: the command once per line of PBS_NODEFILE
FAKE_PBSDSH = f"""#!/bin/bash
sleep {LAUNCH_DELAY}
[[ $1 == -- ]] && shift
for _ in $(seq "$(wc -l < "$PBS_NODEFILE")"); do "$@" & done
wait
"""


@pytest.fixture(scope="module")
def product_names(asn, tmp_path_factory) -> list[str]:
    """The products a synchronous run writes (the scripts pass no PSFMASK)."""
    out = tmp_path_factory.mktemp("synchronous")
    return sorted(p.name for p in run_coron3(asn, out, scheduler="synchronous", progress=False))


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == pgid:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _end_group(pgid: int) -> None:
    """Stop what the script left running (scheduler, workers): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.2)


def run_batch_script(script: Path, env: dict[str, str], folder: Path) -> tuple[int, str, str]:
    """Run ``script`` with bash in ``folder``, in a process group of its own that is ended
    afterwards, whatever happened. Output goes to files: the scheduler and workers the
    script leaves in the background would hold pipes open."""
    stdout, stderr = folder / "job.out", folder / "job.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen(
            ["bash", str(script)],
            env=env,
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            _end_group(process.pid)
    return code, stdout.read_text(), stderr.read_text()


def _fake_launcher(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return folder


def _slurm_job(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return ROOT / "cluster" / "slurm" / "coron-dask.sbatch", {
        "PATH": str(_fake_launcher(tmp_path / "bin", "srun", FAKE_SRUN)),
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "2",
        "SLURM_MEM_PER_CPU": "1024",
    }


def _pbs_job(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    return ROOT / "cluster" / "pbs" / "coron-dask.pbs", {
        "PATH": str(_fake_launcher(tmp_path / "bin", "pbsdsh", FAKE_PBSDSH)),
        "PBS_JOBID": "4243.pbs-server",
        "PBS_NODEFILE": str(nodefile),
        "PBS_O_WORKDIR": str(tmp_path),
    }


@pytest.mark.parametrize("job", [_slurm_job, _pbs_job], ids=["slurm", "pbs"])
def test_batch_script_plans_only_after_its_workers_joined(job, asn, product_names, tmp_path):
    script, job_env = job(tmp_path)
    scratch, out = tmp_path / "scratch", tmp_path / "products"
    (tmp_path / "tmp").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))},
        **job_env,
        "PATH": f"{job_env['PATH']}{os.pathsep}{os.environ['PATH']}",
        "SCRATCH": str(scratch),
        "TMPDIR": str(tmp_path / "tmp"),
        "ASN": str(asn),
        "OUT": str(out),
        "VENV": str(VENV),
        "SCHEDULER_HOST": "127.0.0.1",  # loopback, any free port: nothing else is disturbed
        "SCHEDULER_PORT": "0",
    }
    code, stdout, stderr = run_batch_script(script, env, tmp_path)
    assert code == 0, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == product_names
    assert sorted(Path(line).name for line in stdout.split()) == product_names

    ours = [line for line in stderr.splitlines() if " - coron_dask." in line]
    waiting = [i for i, line in enumerate(ours) if re.search(r"waiting for 2 workers at ", line)]
    joined = [i for i, line in enumerate(ours) if re.search(r"INFO - 2 workers joined ", line)]
    assert waiting and joined and waiting[0] < joined[0], "\n".join(ours)
    assert re.search(r": [01] joined$", ours[waiting[0]]), ours[waiting[0]]  # run came first
    planned = [i for i, line in enumerate(ours) if "block plan" in line or " workers: " in line]
    assert planned and joined[0] < planned[0], "\n".join(ours)
    for i in planned:  # the pipeline's own account of the workers it planned for, if any
        if " workers: " in ours[i]:
            assert "workers: 2 worker(s)" in ours[i], ours[i]
    run = next(scratch.glob("coron-dask-*"))
    assert json.loads((run / "stats.json").read_text())["workers"] == 2


@pytest.fixture
def empty_scheduler():
    """A scheduler on loopback that no worker ever joins."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=0,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
    ) as cluster:
        yield cluster.scheduler_address


def test_workers_that_never_join_are_one_clear_error(empty_scheduler):
    start = time.monotonic()
    with dask.config.set({"coron_dask.cluster.worker-timeout": 2}):
        with pytest.raises(ClusterError) as error:
            with Cluster(empty_scheduler, wait_for_workers=1, quiet=True) as cluster:
                assert cluster.client is None  # never reached
    assert time.monotonic() - start < 15
    assert str(error.value) == (
        f"0 of 1 worker joined {empty_scheduler} within 2 s "
        "(--wait-for-workers, coron_dask.cluster.worker-timeout)"
    )


def test_cli_wait_for_workers_fails_in_one_line(empty_scheduler, asn, tmp_path, capsys):
    out = tmp_path / "out"
    with dask.config.set({"coron_dask.cluster.worker-timeout": 2}):
        args = ["run", asn, "-o", out, "--scheduler", empty_scheduler, "--wait-for-workers", 2]
        code = main([str(arg) for arg in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1] == (
        f"coron-dask: error: cluster: 0 of 2 workers joined {empty_scheduler} within 2 s "
        "(--wait-for-workers, coron_dask.cluster.worker-timeout); no product was written"
    )
    assert any(f"waiting for 2 workers at {empty_scheduler}: 0 joined" in line for line in err)
    assert not out.exists() or not any(out.iterdir())


def test_jobqueue_waits_for_the_workers_its_jobs_bring():
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.processes": 4}):
        assert _workers_to_await(None, "slurm", 3, None) == 12
        assert _workers_to_await(None, "slurm", None, (2, 10)) == 8  # what --adapt 2:10 keeps
        assert _workers_to_await(5, "slurm", 3, None) == 5
    with dask.config.set({"coron_dask.cluster.wait-for-workers": 3}):
        assert _workers_to_await(None, "local", None, None) == 3
