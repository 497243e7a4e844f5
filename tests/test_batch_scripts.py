"""The run waits for its workers before it plans blocks: the batch scripts in cluster/ run
with bash on this machine as their batch system would run them (a fake ``srun`` or
``pbsdsh`` starts the workers late), and a scheduler whose workers never come ends the run
with one line."""

import json
import logging
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
from coron_dask.cli.main import main
from coron_dask.core.errors import ClusterError
from coron_dask.runtime.deploy import Cluster, _workers_to_await

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]  # not resolved: the virtualenv, not its base Python
LAUNCH_DELAY = 4  # seconds: coron-dask run is connected and waiting when workers start

#: srun as a job step: drops its own options and starts on each node of the job, "node<i>"
#: (SLURM_NODEID i), as many copies of the command as SLURM_TASKS_PER_NODE gives it tasks
FAKE_SRUN = r"""#!/bin/bash
sleep "${FAKE_LAUNCH_DELAY:-@DELAY@}"
while [[ $1 == -* ]]; do shift; done
node=0
IFS=, read -ra items <<< "${SLURM_TASKS_PER_NODE:-$SLURM_NTASKS}"
for item in "${items[@]}"; do  # "8(x2),4": 8 tasks on each of 2 nodes, then 4
    tasks=${item%%"("*} repeat=1
    [[ $item =~ \(x([0-9]+)\)$ ]] && repeat=${BASH_REMATCH[1]}
    for ((r = 0; r < repeat; r++, node++)); do
        for ((t = 0; t < tasks; t++)); do
            SLURM_NODEID=$node SLURMD_NODENAME=node$node "$@" &
        done
    done
done
wait
""".replace("@DELAY@", str(LAUNCH_DELAY))

#: pbsdsh (Torque's and PBS Pro's): with ``-n I`` the command once, on the host of line I
#: (from 0) of PBS_NODEFILE; without, once per line; FAKE_HOST says on which host
FAKE_PBSDSH = r"""#!/bin/bash
sleep "${FAKE_LAUNCH_DELAY:-@DELAY@}"
index=
while [[ $1 == -* && $1 != -- ]]; do
    case $1 in -n) index=$2; shift 2 ;; *) shift ;; esac
done
[[ $1 == -- ]] && shift
mapfile -t lines < "$PBS_NODEFILE"
for i in "${!lines[@]}"; do
    if [[ -z $index || $index == "$i" ]]; then FAKE_HOST=${lines[i]} "$@" & fi
done
wait
""".replace("@DELAY@", str(LAUNCH_DELAY))


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
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_TASKS_PER_NODE": "2",
        "SLURM_JOB_CPUS_PER_NODE": "2",
        "SLURM_MEM_PER_CPU": "2048",  # 2 GiB of the 4 for scheduler and client: 1 GiB workers
    }


def _pbs_job(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    return ROOT / "cluster" / "pbs" / "coron-dask.pbs", {
        "PATH": str(_fake_launcher(tmp_path / "bin", "pbsdsh", FAKE_PBSDSH)),
        "PBS_JOBID": "4243.pbs-server",
        "PBS_NODEFILE": str(nodefile),
        "PBS_O_WORKDIR": str(tmp_path),
        "PBS_NUM_PPN": "2",  # Torque: the node file lists the host once per core
        "MEM_PER_NODE": "4gb",  # 2gb for scheduler and client: 1 GiB workers
    }


@pytest.mark.parametrize("job", [_slurm_job, _pbs_job], ids=["slurm", "pbs"])
def test_batch_script_plans_only_after_its_workers_joined(job, asn, product_names, tmp_path):
    script, job_env = job(tmp_path)
    scratch, out = tmp_path / "scratch", tmp_path / "products"
    (tmp_path / "tmp").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "NCPUS"))},
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
    waiting = [
        i
        for i, line in enumerate(ours)
        if re.search(r"waiting (?:up to \S+ s )?for 2 workers at ", line)
    ]
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


#: dask: ``scheduler`` writes its scheduler file and is done; ``worker`` writes a line to
#: FAKE_LOG for each worker process it would start (--nworkers): its host and its options
FAKE_DASK = r"""#!/bin/bash
command=$1 workers=1 options=("${@:2}")
shift
while (($#)); do
    case $1 in
        --scheduler-file) [[ $command == scheduler ]] && echo '{}' > "$2" ;;
        --nworkers) workers=$2 ;;
    esac
    shift
done
if [[ $command == worker ]]; then
    for ((i = 0; i < workers; i++)); do
        echo "${SLURMD_NODENAME:-$FAKE_HOST} ${options[*]}" >> "$FAKE_LOG"
    done
fi
"""

#: coron-dask run: writes its options to FAKE_LOG.run and, like the real one, waits for the
#: workers it is told to (and a moment more, for any it was not told of)
FAKE_CORON_DASK = r"""#!/bin/bash
echo "$*" > "$FAKE_LOG.run"
while (($#)); do [[ $1 == --wait-for-workers ]] && workers=$2; shift; done
for _ in $(seq 100); do
    if (($(cat "$FAKE_LOG" 2>/dev/null | wc -l) >= workers)); then sleep 0.3; exit 0; fi
    sleep 0.1
done
exit 3
"""

#: qstat -f JOB: the job's record, from the file FAKE_QSTAT
FAKE_QSTAT = r"""#!/bin/bash
[[ $1 == -f && $2 == "$PBS_JOBID" && -n $FAKE_QSTAT ]] && cat "$FAKE_QSTAT"
"""


def launched_workers(
    script: Path, job_env: dict[str, str], tmp_path: Path
) -> tuple[int, str, list[tuple[str, int, int]], str]:
    """Run a batch ``script`` in the environment of a job, ``job_env``, with fake ``srun``,
    ``pbsdsh``, ``qstat`` and a fake virtualenv whose ``dask`` and ``coron-dask`` start
    nothing but record what they are asked: the script's exit code and stderr, the workers it
    started as sorted (host, memory limit in bytes, threads), and the options of its run."""
    from dask.utils import parse_bytes

    bin_ = tmp_path / "bin"
    for name, text in [
        ("srun", FAKE_SRUN),
        ("pbsdsh", FAKE_PBSDSH),
        ("qstat", FAKE_QSTAT),
        ("dask", FAKE_DASK),
        ("coron-dask", FAKE_CORON_DASK),
    ]:
        _fake_launcher(bin_, name, text)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    # pbsdsh's tasks run in a login shell, which may reset PATH: the venv puts the fakes back
    (venv / "bin" / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    log = tmp_path / "workers.log"
    env = {
        "PATH": f"{bin_}{os.pathsep}/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VENV": str(venv),
        "ASN": str(tmp_path / "asn.json"),
        "SCRATCH": str(tmp_path / "scratch"),
        "FAKE_LOG": str(log),
        "FAKE_LAUNCH_DELAY": "0",
        **job_env,
    }
    code, _, stderr = run_batch_script(script, env, tmp_path)
    workers = []
    for line in log.read_text().splitlines() if log.exists() else []:
        host, *options = line.split()
        value = dict(zip(options, [*options[1:], ""], strict=True))
        workers.append((host, parse_bytes(value["--memory-limit"]), int(value["--nthreads"])))
    run = log.with_name("workers.log.run")
    return code, stderr, sorted(workers), run.read_text() if run.exists() else ""


def _on(host: str, workers: int, mib: int, threads: int = 1) -> list[tuple[str, int, int]]:
    return [(host, mib * 2**20, threads)] * workers


SLURM_SCRIPT = ROOT / "cluster" / "slurm" / "coron-dask.sbatch"
PBS_SCRIPT = ROOT / "cluster" / "pbs" / "coron-dask.pbs"


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        pytest.param(  # --mem=16G --ntasks=4 on 1 node: 2 GiB kept, 14 shared by 4 workers
            {"SLURM_MEM_PER_NODE": "16384", "SLURM_TASKS_PER_NODE": "4"},
            _on("node0", 4, 3584),
            id="mem-1-node",
        ),
        pytest.param(  # --mem=32G --nodes=2 --ntasks-per-node=8
            {"SLURM_MEM_PER_NODE": "32768", "SLURM_TASKS_PER_NODE": "8(x2)"},
            _on("node0", 8, 3840) + _on("node1", 8, 4096),
            id="mem-2-nodes",
        ),
        pytest.param(  # --mem-per-cpu=4G --ntasks-per-node=8 on 1 node
            {"SLURM_MEM_PER_CPU": "4096", "SLURM_TASKS_PER_NODE": "8"},
            _on("node0", 8, 3840),
            id="mem-per-cpu-1-node",
        ),
        pytest.param(  # --mem-per-cpu=4G --nodes=2 --ntasks-per-node=4 --cpus-per-task=2
            {
                "SLURM_MEM_PER_CPU": "4096",
                "SLURM_TASKS_PER_NODE": "4(x2)",
                "SLURM_JOB_CPUS_PER_NODE": "8(x2)",
                "SLURM_CPUS_PER_TASK": "2",
            },
            _on("node0", 4, 7680, threads=2) + _on("node1", 4, 8192, threads=2),
            id="mem-per-cpu-2-nodes",
        ),
        pytest.param(  # --mem=8G --ntasks=5 laid out 3 + 2, and 1G kept for scheduler, client
            {"SLURM_MEM_PER_NODE": "8192", "SLURM_TASKS_PER_NODE": "3,2", "SCHEDULER_MEMORY": "1G"},
            _on("node0", 3, 7168 // 3) + _on("node1", 2, 4096),
            id="mem-uneven-nodes",
        ),
    ],
)
def test_sbatch_gives_each_worker_its_share_of_its_node(job, expected, tmp_path):
    """Whether the job asks for --mem or --mem-per-cpu, each worker's --memory-limit is its
    node's memory over its workers, after SCHEDULER_MEMORY on the first node (the scheduler
    and the client run there), and the run waits for all of them."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": str(len(expected)), **job}
    code, stderr, workers, run = launched_workers(SLURM_SCRIPT, env, tmp_path)
    assert code == 0, stderr[-3000:]
    assert workers == sorted(expected)
    assert f"--wait-for-workers {len(expected)} " in run


def test_sbatch_refuses_a_first_node_with_no_memory_for_its_workers(tmp_path):
    """--mem-per-cpu=1G with 2 tasks on 1 node: the scheduler and client's 2 GiB leave the
    workers nothing; the job says so rather than starting workers that cannot run."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_MEM_PER_CPU": "1024", "SLURM_TASKS_PER_NODE": "2"}
    code, stderr, workers, run = launched_workers(SLURM_SCRIPT, env, tmp_path)
    assert code == 1
    assert "would leave 0 MiB to each of its 2 workers (SCHEDULER_MEMORY=2G" in stderr
    assert workers == [] and run == ""


#: ``qstat -f`` of a PBS Pro job, qsub -l select=2:ncpus=8:mem=32gb
PBS_PRO_QSTAT = """Job Id: 4243.pbs-server
    Job_Name = coron-dask
    Resource_List.mem = 64gb
    Resource_List.ncpus = 16
    Resource_List.nodect = 2
    Resource_List.place = free
    Resource_List.select = 2:ncpus=8:mem=32gb
    Resource_List.walltime = 02:00:00
"""

#: ``qstat -f`` of a Torque job, qsub -l nodes=2:ppn=8,pmem=4gb
TORQUE_QSTAT = """Job Id: 4243.pbs-server
    Job_Name = coron-dask
    Resource_List.nodect = 2
    Resource_List.nodes = 2:ppn=8
    Resource_List.pmem = 4gb
    Resource_List.walltime = 02:00:00
"""


@pytest.mark.parametrize(
    ("nodes", "job", "qstat", "expected"),
    [
        pytest.param(  # one line per chunk
            ["n1", "n2"],
            {"NCPUS": "8"},
            PBS_PRO_QSTAT,
            _on("n1", 8, 3840) + _on("n2", 8, 4096),
            id="pbs-pro",
        ),
        pytest.param(  # select=2:ncpus=8:mpiprocs=8:mem=32gb, one line per MPI rank
            ["n1"] * 8 + ["n2"] * 8,
            {"NCPUS": "8"},
            PBS_PRO_QSTAT,
            _on("n1", 8, 3840) + _on("n2", 8, 4096),
            id="pbs-pro-mpiprocs",
        ),
        pytest.param(  # one line per core
            ["n1"] * 8 + ["n2"] * 8,
            {"PBS_NUM_PPN": "8", "PBS_NUM_NODES": "2", "PBS_NP": "16"},
            TORQUE_QSTAT,
            _on("n1", 8, 3840) + _on("n2", 8, 4096),
            id="torque",
        ),
        pytest.param(  # nodes=1:ppn=4, and the node's memory and the scheduler's set by hand
            ["n1"] * 4,
            {"PBS_NUM_PPN": "4", "MEM_PER_NODE": "16gb", "SCHEDULER_MEMORY": "1gb"},
            TORQUE_QSTAT,
            _on("n1", 4, 3840),
            id="torque-1-node-by-hand",
        ),
    ],
)
def test_pbs_starts_one_worker_per_core_on_each_host(nodes, job, qstat, expected, tmp_path):
    """Whether PBS_NODEFILE lists a host once per core (Torque) or once per chunk (PBS Pro),
    each host gets one worker per core, and each worker its share of the host's memory as the
    job asked for it (qstat), after SCHEDULER_MEMORY on the first host."""
    (tmp_path / "nodefile").write_text("".join(f"{node}\n" for node in nodes))
    (tmp_path / "qstat").write_text(qstat)
    env = {
        "PBS_JOBID": "4243.pbs-server",
        "PBS_NODEFILE": str(tmp_path / "nodefile"),
        "PBS_O_WORKDIR": str(tmp_path),
        "FAKE_QSTAT": str(tmp_path / "qstat"),
        **job,
    }
    code, stderr, workers, run = launched_workers(PBS_SCRIPT, env, tmp_path)
    assert code == 0, stderr[-3000:]
    assert workers == sorted(expected)
    assert f"--wait-for-workers {len(expected)} " in run


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
    assert code == 3
    assert err[-1] == (
        f"coron-dask: error: cluster: 0 of 2 workers joined {empty_scheduler} within 2 s "
        "(--wait-for-workers, coron_dask.cluster.worker-timeout); no product was written"
    )
    waiting = f"waiting up to 2 s for 2 workers at {empty_scheduler}: 0 joined"
    assert any(waiting in line for line in err)
    assert not out.exists() or not any(out.iterdir())


def test_a_wait_for_batch_jobs_says_what_the_queue_says(empty_scheduler, tmp_path, caplog):
    """Workers of batch jobs still in the queue: the wait says so, as squeue reports them,
    every status-interval, then ends in one line."""
    from distributed import Client

    from coron_dask.runtime.connection import await_workers
    from coron_dask.runtime.jobqueue import queue_state

    squeue = tmp_path / "squeue"
    squeue.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/asked"\necho \'101 PENDING Resources\'\n'
    )
    squeue.chmod(0o755)
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    settings = {"coron_dask.cluster.status-interval": 0.5}
    with (
        pytest.MonkeyPatch.context() as patch,
        dask.config.set(settings),
        Client(empty_scheduler, set_as_default=False) as client,
        caplog.at_level(logging.INFO, logger="coron_dask"),
    ):
        patch.setenv("PATH", path)
        with pytest.raises(ClusterError, match="0 of 2 workers joined"):
            await_workers(client, 2, timeout=2, queue=lambda: queue_state("slurm", ["101"]))
    assert (tmp_path / "asked").read_text().split() == [
        "--noheader",
        "--format=%i",
        "%T",
        "%r",
        "--jobs",
        "101",
    ]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("coron_dask")]
    assert (
        lines[0] == f"waiting up to 2 s for 2 workers at {empty_scheduler}: 0 joined; "
        "batch jobs: 101 PENDING Resources"
    )
    assert (
        sum(
            "still waiting for 2 workers" in line and "101 PENDING Resources" in line
            for line in lines
        )
        >= 2
    )
    assert queue_state("slurm", []) == "none submitted yet"


def test_jobqueue_waits_for_the_workers_its_jobs_bring():
    with dask.config.set({"jobqueue.slurm.cores": 8, "jobqueue.slurm.processes": 4}):
        assert _workers_to_await(None, "slurm", 3, None) == 12
        assert _workers_to_await(None, "slurm", None, (2, 10)) == 8  # what --adapt 2:10 keeps
        assert _workers_to_await(5, "slurm", 3, None) == 5
    with dask.config.set({"coron_dask.cluster.wait-for-workers": 3}):
        assert _workers_to_await(None, "local", None, None) == 3
