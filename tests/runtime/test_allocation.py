"""The allocation a run sizes its cluster from: fake nodes, control groups (v1, v2, the limit
on an ancestor as batch systems set it) and batch-job variables, read from folder trees in
tmp_path; and real processes under ``taskset`` and in a SLURM job's environment."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask
import dask.system
import psutil
import pytest

from coron_dask.core.errors import CoronInputError
from coron_dask.pipeline.run import check_execution
from coron_dask.runtime import deploy, resources
from coron_dask.runtime.resources import allocation

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
#: The fake node: 64 CPUs, 256 GiB.
NODE_CPUS, NODE_MEMORY = 64, 256 * GIB
#: The batch job's group, an ancestor of the process's own, and the process's below it.
JOB, TASK = "/slurm/uid_1000/job_42", "/slurm/uid_1000/job_42/step_0/task_0"


def fake_proc(root, cgroup_lines, rss_limit="unlimited"):
    """A /proc of a process on the fake node whose control groups ``cgroup_lines`` name."""
    (root / "self").mkdir(parents=True)
    (root / "self/status").write_text(
        f"Name:\tpython\nCpus_allowed:\tffffffff,ffffffff\nCpus_allowed_list:\t0-{NODE_CPUS - 1}\n"
    )
    (root / "self/cgroup").write_text("".join(f"{line}\n" for line in cgroup_lines))
    (root / "self/limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        f"Max resident set          {rss_limit:<20} {rss_limit:<20} bytes     \n"
    )
    (root / "meminfo").write_text(f"MemTotal:       {NODE_MEMORY // 1024} kB\nMemFree: 1 kB\n")
    return root


def write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(f"{text}\n")


def cgroup_v2(tmp_path, cpus=4, memory=16 * GIB):
    """A v2 tree: the job's group limits ``cpus`` and ``memory``; the task's under it none."""
    root = tmp_path / "cgroup"
    write(root / JOB[1:], cpu_max=f"{cpus * 100000} 100000", memory_max=memory)
    write(root / TASK[1:], cpu_max="max 100000", memory_max="max", memory_high="max")
    return fake_proc(tmp_path / "proc", [f"0::{TASK}"]), root


def cgroup_v1(tmp_path, cpus=4, memory=16 * GIB):
    """A v1 tree, cpu and cpuacct mounted together (``cpu,cpuacct``, no link named ``cpu``):
    the job's groups limit ``cpus`` and ``memory``; the task's under them none."""
    root = tmp_path / "cgroup"
    cpu = root / "cpu,cpuacct"
    write(cpu / JOB[1:], cpu_cfs_quota_us=cpus * 100000, cpu_cfs_period_us=100000)
    write(cpu / TASK[1:], cpu_cfs_quota_us=-1, cpu_cfs_period_us=100000)
    write(root / "memory" / JOB[1:], memory_limit_in_bytes=memory)
    write(root / "memory" / TASK[1:], memory_limit_in_bytes=9223372036854771712)
    write(root / "memory", memory_limit_in_bytes=9223372036854771712)
    lines = [f"5:memory:{TASK}", f"3:cpu,cpuacct:{TASK}", "2:pids:/", "0::/"]
    return fake_proc(tmp_path / "proc", lines), root


@pytest.fixture
def no_job(monkeypatch):
    """This process's environment without a batch job's variables."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "PBS_")) or name == "NCPUS":
            monkeypatch.delenv(name)


@pytest.fixture
def faked(monkeypatch, no_job):
    """Point ``resources`` at a fake tree: ``faked(proc, cgroups)``."""

    def use(proc, cgroups):
        monkeypatch.setattr(resources, "PROC", proc)
        monkeypatch.setattr(resources, "CGROUPS", cgroups)

    return use


@pytest.mark.parametrize("tree", [cgroup_v2, cgroup_v1], ids=["v2", "v1"])
def test_a_jobs_cgroup_on_a_large_node_gives_its_own_cpus_and_memory(tree, tmp_path):
    proc, cgroups = tree(tmp_path)
    found = allocation(proc, cgroups, environ={})
    assert (found.cpus, found.memory) == (4, 16 * GIB)
    assert "cgroup CPU quota" in found.cpus_from and "job_42" in found.cpus_from
    assert "cgroup memory limit" in found.memory_from and "job_42" in found.memory_from
    # the node alone, without the job's limits
    shutil.rmtree(cgroups)
    found = allocation(proc, cgroups, environ={})
    assert (found.cpus, found.memory) == (NODE_CPUS, NODE_MEMORY)
    assert found.memory_from == "the node's memory (MemTotal)"


@pytest.mark.parametrize("tree", [cgroup_v2, cgroup_v1], ids=["v2", "v1"])
def test_default_local_cluster_in_a_jobs_cgroup_is_four_workers_of_4_gib(
    tree, tmp_path, faked, caplog
):
    """4 CPUs and 16 GiB of a 64-CPU, 256 GiB node: 4 workers of 4 GiB each, not 64 of 4 GiB
    (distributed's "auto" shares the node); the log names the sources."""
    faked(*tree(tmp_path))
    with caplog.at_level(logging.INFO, logger=deploy.__name__):
        count, limit = deploy.local_cluster_size()
    assert (count, limit) == (4, 4 * GIB)
    said = caplog.messages[-1]
    assert said.startswith("cluster: 4 worker(s) from the cgroup CPU quota (")
    assert "4.00 GiB each from the cgroup memory limit (" in said and "16.00 GiB / 4)" in said


def test_the_smallest_cgroup_limit_wins_and_memory_high_counts(tmp_path):
    """v2 memory.high (throttling) under a job's memory.max; a quota of 2.5 CPUs rounds up
    to 3, as dask rounds."""
    proc, cgroups = cgroup_v2(tmp_path)
    write(cgroups / TASK[1:], cpu_max="250000 100000", memory_high=3 * GIB)
    found = allocation(proc, cgroups, environ={})
    assert (found.cpus, found.memory) == (3, 3 * GIB)
    assert "memory.high" in found.memory_from and "task_0" in found.memory_from


def test_affinity_and_rss_limit(tmp_path):
    proc = fake_proc(tmp_path / "proc", ["0::/"], rss_limit=str(5 * GIB))
    (proc / "self/status").write_text("Cpus_allowed_list:\t0,2,8-11\n")
    found = allocation(proc, tmp_path / "none", environ={})
    assert (found.cpus, found.memory) == (6, 5 * GIB)
    assert found.cpus_from == "the CPU affinity (Cpus_allowed_list 0,2,8-11)"
    assert found.memory_from == "the RSS resource limit (RLIMIT_RSS)"


SLURM = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "1"}


@pytest.mark.parametrize(
    ("environ", "cpus", "memory", "cpus_from", "memory_from"),
    [
        (  # salloc -c 4 --mem 16G
            {
                **SLURM,
                "SLURM_CPUS_PER_TASK": "4",
                "SLURM_CPUS_ON_NODE": "4",
                "SLURM_JOB_CPUS_PER_NODE": "4",
                "SLURM_MEM_PER_NODE": "16384",
            },
            4,
            16 * GIB,
            "SLURM_CPUS_PER_TASK=4",
            "SLURM_MEM_PER_NODE=16384",
        ),
        (  # sbatch -n 8 --mem-per-cpu 2G: no SLURM_CPUS_PER_TASK
            {**SLURM, "SLURM_CPUS_ON_NODE": "8", "SLURM_MEM_PER_CPU": "2048"},
            8,
            16 * GIB,
            "SLURM_CPUS_ON_NODE=8",
            "SLURM_MEM_PER_CPU=2048 × 8 CPUs",
        ),
        (  # the third node of three, --mem=0 (the whole node)
            {
                **SLURM,
                "SLURM_JOB_CPUS_PER_NODE": "16(x2),6",
                "SLURM_NODEID": "2",
                "SLURM_MEM_PER_NODE": "0",
            },
            6,
            NODE_MEMORY,
            "SLURM_JOB_CPUS_PER_NODE=16(x2),6",
            "the node's memory (MemTotal)",
        ),
        (  # PBS Pro: select=1:ncpus=12:mem=20gb; its memory is in the job's cgroup only
            {"PBS_JOBID": "7.server", "NCPUS": "12", "OMP_NUM_THREADS": "12"},
            12,
            NODE_MEMORY,
            "NCPUS=12",
            "the node's memory (MemTotal)",
        ),
        (  # Torque nodes=1:ppn=3
            {"PBS_JOBID": "8.server", "PBS_NUM_PPN": "3", "PBS_NP": "3"},
            3,
            NODE_MEMORY,
            "PBS_NUM_PPN=3",
            "the node's memory (MemTotal)",
        ),
        (  # no job: the variables mean nothing
            {"SLURM_CPUS_PER_TASK": "2", "SLURM_MEM_PER_NODE": "1024", "NCPUS": "2"},
            NODE_CPUS,
            NODE_MEMORY,
            f"the CPU affinity (Cpus_allowed_list 0-{NODE_CPUS - 1})",
            "the node's memory (MemTotal)",
        ),
    ],
    ids=["salloc", "mem-per-cpu", "third-node", "pbs-pro", "torque", "no-job"],
)
def test_batch_job_variables(environ, cpus, memory, cpus_from, memory_from, tmp_path):
    proc = fake_proc(tmp_path / "proc", ["0::/"])
    found = allocation(proc, tmp_path / "none", environ=environ)
    assert (found.cpus, found.memory, found.cpus_from, found.memory_from) == (
        cpus,
        memory,
        cpus_from,
        memory_from,
    )


def test_options_and_settings_still_override(tmp_path, faked):
    faked(*cgroup_v2(tmp_path))
    assert deploy.local_cluster_size(n_workers=2) == (2, 8 * GIB)
    assert deploy.local_cluster_size(memory_limit="1GiB") == (4, "1GiB")
    assert deploy.local_cluster_size(threads_per_worker=2) == (2, 8 * GIB)
    settings = {"coron_dask.cluster.n-workers": 8, "coron_dask.cluster.memory-limit": "3GiB"}
    with dask.config.set(settings):
        assert deploy.local_cluster_size() == (8, "3GiB")
        assert deploy.local_cluster_size(n_workers=1, memory_limit="auto") == (1, 16 * GIB)


def test_memory_limit_is_checked_against_the_allocation(tmp_path, faked):
    """4 × 5 GiB fits this machine (and a 64-CPU node) but not the job's 16 GiB."""
    faked(*cgroup_v2(tmp_path))
    assert check_execution(memory_limit="4GiB")["memory_limit"] == "4GiB"
    with pytest.raises(CoronInputError) as refused:
        check_execution(memory_limit="5GiB")
    said = str(refused.value)
    assert "4 worker(s) × 5GiB is more than the 16.0 GiB this run may use (the cgroup" in said
    with pytest.raises(CoronInputError):
        check_execution(memory_limit="9GiB", n_workers=2)


def test_in_process_threads_follow_the_allocation(tmp_path, faked):
    """dask's threaded scheduler in this process: the allocation's CPUs and memory, as the
    block plan sees them; dask's num_workers, if set, still says the threads."""
    faked(*cgroup_v2(tmp_path))
    with deploy.Cluster("threads", quiet=True):
        assert dask.config.get("num_workers") == 4
        workers = deploy.measure_workers(None)
        assert (workers.count, workers.threads, workers.memory_limit) == (1, 4, 16 * GIB)
    with dask.config.set(num_workers=3), deploy.Cluster("threads", quiet=True):
        assert deploy.measure_workers(None).threads == 3
    with deploy.Cluster("synchronous", quiet=True):
        assert deploy.measure_workers(None).threads == 1


def test_this_process_allocation_is_within_its_affinity_and_the_machine():
    """The real /proc and /sys/fs/cgroup: no more CPUs than ``os.sched_getaffinity`` gives,
    no more memory than psutil reads for the machine."""
    found = allocation(environ={})
    assert 1 <= found.cpus <= len(os.sched_getaffinity(0))
    assert found.memory <= psutil.virtual_memory().total


TASKSET = shutil.which("taskset")
COUNT_WORKERS = (
    "from coron_dask.runtime.deploy import Cluster\n"
    "with Cluster(dashboard_address='127.0.0.1:0', quiet=True) as cluster:\n"
    "    info = cluster.client.scheduler_info(n_workers=-1)['workers'].values()\n"
    "    print(len(info), min(w['memory_limit'] for w in info))\n"
)


@pytest.mark.skipif(TASKSET is None, reason="no taskset")
def test_default_local_cluster_under_taskset_has_one_worker():
    """``taskset -c 0``: the default LocalCluster has 1 worker (os.cpu_count gave one per
    core of the machine); without it, as many as dask counts CPUs (affinity and the
    top-level cgroup quota), outside any batch job."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_"))}
    environ["PYTHONPATH"] = str(ROOT)
    for pinned, expected in ((True, 1), (False, dask.system.cpu_count())):
        command = [sys.executable, "-c", COUNT_WORKERS]
        result = subprocess.run(
            [TASKSET, "-c", "0", *command] if pinned else command,
            capture_output=True,
            text=True,
            timeout=120,
            env=environ,
        )
        assert result.returncode == 0, result.stderr
        workers, _ = result.stdout.split()
        assert int(workers) == expected, (pinned, result.stdout)


def test_a_slurm_jobs_run_has_its_one_worker_of_3_gib(asn, observation_dir, tmp_path):
    """A run in a SLURM job's environment (1 CPU, --mem 3G), on a LocalCluster and in
    process: --stats reports 1 worker of at most 3 GiB."""
    job = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOBID": "4242",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS": "1",
        "SLURM_NODEID": "0",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_CPUS_ON_NODE": "1",
        "SLURM_JOB_CPUS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": "1",
        "SLURM_MEM_PER_NODE": "3072",
        "PYTHONPATH": str(ROOT),
    }
    for where, extra in (
        ("cluster", {"DASK_CORON_DASK__CLUSTER__IN_PROCESS_BELOW": "None"}),
        ("in-process", {}),
    ):
        stats = tmp_path / f"{where}.json"
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "coron_dask",
                "run",
                str(asn),
                "-o",
                str(tmp_path / where),
                "--psfmask",
                str(observation_dir / "psfmask.fits"),
                "--no-progress",
                "--stats",
                str(stats),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **job, **extra},
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(stats.read_text())
        assert summary["workers"] == 1, where
        assert 0 < summary["memory_limit_per_worker"] <= 3 * GIB, where
        assert "SLURM_MEM_PER_NODE=3072" in result.stderr or where == "in-process"
