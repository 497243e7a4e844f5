"""What this process may use and what it holds: the CPUs and memory of its allocation (the
node's, or less where its CPU affinity, a control group of it or of an ancestor, a
resource limit or a SLURM or PBS job says less), and the memory a process holds, as the
block plan counts them."""

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

# loaded before a baseline is measured: the modules every task imports (``kernels``, which
# ``kernels.blocks`` loads whole, holds all that ``steps.blocks`` imports; runtime may not
# import steps)
import coron_dask.io.fitsfile
import coron_dask.kernels.blocks  # noqa: F401

#: Where the kernel shows this process (``self/status``, ``self/cgroup``, ``self/limits``,
#: ``meminfo``) and mounts the control groups (v2 at the root, v1 a folder per controller).
PROC, CGROUPS = Path("/proc"), Path("/sys/fs/cgroup")
#: The control groups' limits a process's memory must stay under: hard (v1, v2) and the
#: v2 limit above which the kernel throttles and reclaims (a batch job's are in its own
#: group or an ancestor, not in the root's).
CGROUP_LIMITS = ("memory.limit_in_bytes", "memory.max", "memory.high")
MIB = 2**20


@dataclass(frozen=True)
class Allocation:
    """The CPUs and memory (bytes) this process may use, and where each figure came from
    (the smallest source: affinity, a control group, a resource limit, a batch job)."""

    cpus: int
    memory: int
    cpus_from: str
    memory_from: str


def allocation(
    proc: Path | None = None, cgroups: Path | None = None, environ: Mapping[str, str] | None = None
) -> Allocation:
    """The CPUs and memory this process may use: the least of what the node has, its CPU
    affinity, the CPU quota and memory limit of its control groups and their ancestors (v1
    and v2; a batch system sets them on the job's group, above the process's own), the RSS
    resource limit, and a SLURM or PBS job's variables in ``environ`` (default: this
    process's). ``proc`` and ``cgroups`` are where /proc and /sys/fs/cgroup are read
    (default ``PROC``, ``CGROUPS``): a test passes a folder tree."""
    proc, cgroups = proc or PROC, cgroups or CGROUPS
    environ = os.environ if environ is None else environ
    # the first of equal figures names it: a batch job's variable says most
    cpus, cpus_from = min(
        [*_job_cpus(environ), *_cgroup_cpus(proc, cgroups), _affinity(proc)],
        key=lambda source: source[0],
    )
    memory, memory_from = min(
        [*_job_memory(environ), *_cgroup_memory(proc, cgroups), *_rss_limit(proc), _node(proc)],
        key=lambda source: source[0],
    )
    return Allocation(max(1, cpus), memory, cpus_from, memory_from)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _affinity(proc: Path) -> tuple[int, str]:
    """The CPUs this process may run on (its affinity, as ``os.sched_getaffinity`` gives
    it: ``Cpus_allowed_list`` of /proc/self/status)."""
    found = re.search(r"^Cpus_allowed_list:\s*(\S+)", _read(proc / "self/status") or "", re.M)
    if found is None:
        return os.cpu_count() or 1, "os.cpu_count()"
    count = sum(len(_figures(part)) for part in found[1].split(","))
    return count, f"the CPU affinity (Cpus_allowed_list {found[1]})"


def _figures(text: str) -> range:
    """The figures of ``a-b`` or ``a``."""
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def _node(proc: Path) -> tuple[int, str]:
    """The node's memory (MemTotal of /proc/meminfo)."""
    found = re.search(r"^MemTotal:\s*(\d+) kB", _read(proc / "meminfo") or "", re.M)
    if found is None:
        return psutil.virtual_memory().total, "the node's memory"
    return int(found[1]) * 1024, "the node's memory (MemTotal)"


def _rss_limit(proc: Path) -> Iterator[tuple[int, str]]:
    """The RSS resource limit, if set (hard, as distributed reads it)."""
    found = re.search(r"^Max resident set\s+\S+\s+(\d+)", _read(proc / "self/limits") or "", re.M)
    if found is not None and int(found[1]) > 0:
        yield int(found[1]), "the RSS resource limit (RLIMIT_RSS)"


def _cgroup_folders(controller: str, proc: Path, cgroups: Path) -> list[Path]:
    """The folders of this process's control groups of ``controller`` (v1) or of the v2
    group, and of their ancestors up to the mount, from /proc/self/cgroup ("id:controllers:
    path" a line; v2's controllers are empty; v1 controllers mounted together, such as
    ``cpu,cpuacct``, share a folder)."""
    folders = []
    for line in (_read(proc / "self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        names = controllers.split(",") if controllers else []
        if names and controller not in names:
            continue
        for root in [cgroups / controller, cgroups / controllers] if names else [cgroups]:
            if root.is_dir():  # a container's own group may be the mount: its path is not
                group = root / path.lstrip("/")
                chain = [group, *group.parents]
                folders += [p for p in chain if p.is_relative_to(root) and p.is_dir()]
                break
    return folders


def _cgroup_cpus(proc: Path, cgroups: Path) -> Iterator[tuple[int, str]]:
    """The CPU quota of each control group of this process's (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``), in CPUs rounded up, as dask rounds."""
    for folder in _cgroup_folders("cpu", proc, cgroups):
        quota = (_read(folder / "cpu.max") or "").split()
        name = "cpu.max"
        if not quota:
            parts = ("quota", "period")
            quota = [(_read(folder / f"cpu.cfs_{part}_us") or "").strip() for part in parts]
            name = "cpu.cfs_quota_us, cpu.cfs_period_us"
        if len(quota) == 2 and all(part.isdigit() and int(part) > 0 for part in quota):
            cpus = math.ceil(int(quota[0]) / int(quota[1]))
            yield cpus, f"the cgroup CPU quota ({name} {' '.join(quota)} in {folder})"


def _cgroup_memory(proc: Path, cgroups: Path) -> Iterator[tuple[int, str]]:
    """The memory limits of each control group of this process's."""
    for folder in _cgroup_folders("memory", proc, cgroups):
        for name in CGROUP_LIMITS:
            value = (_read(folder / name) or "").strip()
            if value.isdigit() and int(value) > 0:
                yield int(value), f"the cgroup memory limit ({name} in {folder})"


def _job_cpus(environ: Mapping[str, str]) -> Iterator[tuple[int, str]]:
    """The CPUs a SLURM job (``SLURM_JOB_ID`` set) or a PBS job (``PBS_JOBID``) gives this
    node or task: SLURM_CPUS_PER_TASK (``-c``), SLURM_CPUS_ON_NODE, this node's figure of
    SLURM_JOB_CPUS_PER_NODE (``72(x2),36``; the batch script's node is the first); PBS
    Pro's NCPUS (the chunk's ``ncpus`` on this host), PBS_NCPUS, Torque's PBS_NUM_PPN."""
    if environ.get("SLURM_JOB_ID"):
        for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
            if environ.get(name, "").isdigit():
                yield int(environ[name]), f"{name}={environ[name]}"
        per_node = _slurm_node_cpus(environ)
        if per_node is not None:
            yield per_node, f"SLURM_JOB_CPUS_PER_NODE={environ['SLURM_JOB_CPUS_PER_NODE']}"
    if environ.get("PBS_JOBID"):
        for name in ("NCPUS", "PBS_NCPUS", "PBS_NUM_PPN"):
            if environ.get(name, "").isdigit():
                yield int(environ[name]), f"{name}={environ[name]}"


def _slurm_node_cpus(environ: Mapping[str, str]) -> int | None:
    """This node's figure of SLURM_JOB_CPUS_PER_NODE (node SLURM_NODEID, else the first)."""
    figures = []
    for part in environ.get("SLURM_JOB_CPUS_PER_NODE", "").split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if found is None:
            return None
        figures += [int(found[1])] * int(found[2] or 1)
    node = environ.get("SLURM_NODEID", "0")
    return figures[int(node)] if node.isdigit() and int(node) < len(figures) else None


def _job_memory(environ: Mapping[str, str]) -> Iterator[tuple[int, str]]:
    """The memory a SLURM job gives this node: SLURM_MEM_PER_NODE (``--mem``, MiB; 0: the
    whole node), or SLURM_MEM_PER_CPU (``--mem-per-cpu``, MiB) times the job's CPUs on
    this node. PBS sets no variable for memory: its limits are in the job's control group
    (PBS Pro's cgroup hook, Torque's cgroups)."""
    if not environ.get("SLURM_JOB_ID"):
        return
    per_node = environ.get("SLURM_MEM_PER_NODE", "")
    if per_node.isdigit() and int(per_node) > 0:
        yield int(per_node) * MIB, f"SLURM_MEM_PER_NODE={per_node}"
    per_cpu = environ.get("SLURM_MEM_PER_CPU", "")
    cpus = environ.get("SLURM_CPUS_ON_NODE", "")
    cpus = int(cpus) if cpus.isdigit() else _slurm_node_cpus(environ)
    if per_cpu.isdigit() and int(per_cpu) > 0 and cpus:
        yield int(per_cpu) * cpus * MIB, f"SLURM_MEM_PER_CPU={per_cpu} × {cpus} CPUs"


def process_memory() -> int:
    """Resident memory of this process (bytes), once the modules tasks import are loaded:
    a worker's baseline."""
    return psutil.Process().memory_info().rss
