"""Dask workers submitted as SLURM jobs by dask-jobqueue, on a private single-node SLURM cluster
of this machine (tests/slurm_sandbox.py: its own slurm.conf through SLURM_CONF, munge key and
socket, free ports, all in a temporary folder), and proof that the cluster leaves the machine
as it found it: /etc/slurm and /etc/munge untouched, none of its processes left running."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from coron_dask import run_coron3
from tests.conftest import assert_same_products
from tests.slurm_sandbox import NODE, PrivateSlurm, install, processes_of, system_state

ROOT = Path(__file__).resolve().parents[1]
#: what a SLURM cluster runs: any of them still running after a stop would be a leftover
DAEMONS = {"munged", "slurmctld", "slurmd", "slurmstepd", "slurmscriptd"}


@pytest.fixture(scope="module")
def installed() -> None:
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld and slurmd needs root")
    install()


def _daemons() -> set[int]:
    """The SLURM and munge processes running now, whoever started them (zombies aside)."""
    pids = set()
    for process in psutil.process_iter(["name", "status"]):
        if process.info["name"] in DAEMONS and process.info["status"] != psutil.STATUS_ZOMBIE:
            pids.add(process.pid)
    return pids


def _alive(pid: int, name: str) -> bool:
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and process.name() == name
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def slurm(installed):
    """The private cluster, for this module; SLURM_CONF in the environment, so that
    dask-jobqueue's sbatch, squeue and scancel reach it. At teardown, it checks that it
    stopped everything it started and changed nothing of the machine's own SLURM."""
    before = system_state()
    cluster = PrivateSlurm().start()
    folder, conf = cluster.folder, cluster.conf
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SLURM_CONF", str(conf))
            yield cluster
    finally:
        cluster.stop()
    assert not processes_of(conf), "processes of the private SLURM cluster survived it"
    assert not folder.exists()
    assert system_state() == before, "the private SLURM cluster changed /etc/slurm or /etc/munge"


def test_the_private_cluster_leaves_the_machine_as_it_found_it(installed):
    """Two starts and stops in a subprocess, each with a job running when it stops: each
    start runs its own munged, slurmctld and slurmd on its own configuration, and afterwards
    none of what it started runs, its folder is gone, and /etc/slurm and /etc/munge (present
    or not) are byte for byte, owner and mode what they were."""
    before, daemons_before = system_state(), _daemons()
    result = subprocess.run(
        [sys.executable, "-m", "tests.slurm_sandbox", "--cycles", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "SLURM_CONF"},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    cycles = json.loads(result.stdout)
    assert len(cycles) == 2
    assert cycles[0]["folder"] != cycles[1]["folder"]
    for cycle in cycles:
        folder, started = cycle["folder"], cycle["processes"]
        # it ran its own daemons, and a job: a step and the job's command
        assert {"munged", "slurmctld", "slurmd", "slurmstepd", "sleep"} <= set(started.values())
        conf = cycle["conf"]
        assert f"AuthInfo=socket={folder}/munge/munge.socket" in conf
        assert f"StateSaveLocation={folder}/state" in conf and f"NodeName={NODE} " in conf
        assert "/etc/" not in conf and "/var/" not in conf and "/run/" not in conf
        assert not [f"{pid} {name}" for pid, name in started.items() if _alive(int(pid), name)]
        assert not processes_of(Path(folder) / "slurm.conf")
        assert not Path(folder).exists()
    assert _daemons() <= daemons_before  # nothing new runs; the machine's own still do
    assert system_state() == before


def test_slurm_jobs_run_the_pipeline(slurm, busy_observation, busy_baseline, tmp_path):
    """Workers submitted as SLURM jobs by dask-jobqueue, all traffic on loopback."""
    import dask

    from coron_dask.runtime.deploy import Cluster

    site = {
        "jobqueue": {
            "slurm": {
                "cores": 1,
                "processes": 1,
                "memory": "2GiB",
                "walltime": "00:20:00",
                "interface": "lo",
                "local-directory": str(tmp_path),
                "log-directory": str(tmp_path),
                "job-script-prologue": [],
                "worker-extra-args": [],
                "job-extra-directives": [],
            }
        }
    }
    out = tmp_path / "out"
    # key by key: a whole "jobqueue" dict would replace dask-jobqueue's other defaults
    settings = {f"jobqueue.slurm.{key}": value for key, value in site["jobqueue"]["slurm"].items()}
    with dask.config.set(settings), Cluster(kind="slurm", jobs=2, quiet=True) as cluster:
        script = cluster.deployment.job_script()
        assert "#SBATCH --mem=2G" in script and "--interface lo" in script
        paths = run_coron3(
            busy_observation,
            out,
            psfmask=busy_observation.parent / "psfmask.fits",
            cluster=cluster,
            progress=False,
            stats=tmp_path / "stats.json",
        )
        jobs = subprocess.run(
            ["squeue", "-h", "-o", "%i %j %T %N"], capture_output=True, text=True, check=True
        ).stdout
    assert len(paths) == 15  # 13 products, the detection map and the candidates
    assert jobs.count("RUNNING") >= 1, jobs
    assert NODE in jobs, jobs  # the private cluster's node ran them, not the machine's SLURM
    assert json.loads((tmp_path / "stats.json").read_text())["workers"] >= 1
    assert_same_products(out, busy_baseline)


def test_jobs_that_cannot_start_are_shown_waiting_then_one_line(slurm, asn, tmp_path):
    """Batch jobs held in the queue (here: not to begin for an hour): the run prints its
    dashboard, then what it waits for, as squeue reports the jobs, every status-interval;
    then one line, exit 3, no product, and its jobs are cancelled."""
    import yaml

    config = tmp_path / "dask"
    config.mkdir()
    site = {
        "cores": 1,
        "memory": "1GiB",
        "walltime": "00:05:00",
        "interface": "lo",
        "log-directory": str(tmp_path),
        "job-extra-directives": ["--begin=now+3600"],
    }
    (config / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": site}}))
    env = {
        **os.environ,
        "DASK_CONFIG": str(config),
        "DASK_CORON_DASK__CLUSTER__WORKER_TIMEOUT": "6",
        "DASK_CORON_DASK__CLUSTER__STATUS_INTERVAL": "2",
    }
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "coron_dask.cli", "run", asn, "-o", out, "--cluster", "slurm"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    err = result.stderr.strip().splitlines()
    assert result.returncode == 3, result.stderr
    assert err[0].startswith("Dask dashboard: http://")
    waiting = [line for line in err if "waiting" in line]
    assert "waiting up to 6 s for 1 worker at tcp://" in waiting[0]
    assert all(" PENDING BeginTime" in line for line in waiting), waiting
    assert any("still waiting for 1 worker" in line for line in waiting), waiting
    assert err[-1].startswith("coron-dask: error: cluster: 0 of 1 worker joined "), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    queue = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout
    assert queue.strip() == ""
