"""What this machine and this process have: the memory a process may use (the machine's,
or a control group's or resource limit's if less) and the memory a process holds, as the
block plan counts them."""

import os
import resource
from pathlib import Path

import psutil

# loaded before a baseline is measured: the modules every task imports
import coron_dask.io.fitsfile
import coron_dask.kernels.blocks  # noqa: F401

#: The control groups' limits a process's memory must stay under: hard (v1, v2) and the
#: v2 limit above which the kernel throttles and reclaims (a batch job's are in its own
#: group or an ancestor, not in the root's).
CGROUP_LIMITS = ("memory.limit_in_bytes", "memory.max", "memory.high")


def system_memory() -> int:
    """The memory this process may use (bytes): the machine's, or less where a control
    group (a batch job's, a container's) or the RSS resource limit sets less."""
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for folder in _memory_cgroups():
        for name in CGROUP_LIMITS:
            try:
                value = (folder / name).read_text().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) > 0:
                limit = min(limit, int(value))
    rss = resource.getrlimit(resource.RLIMIT_RSS)[1]
    return min(limit, rss) if rss > 0 else limit


def _memory_cgroups() -> list[Path]:
    """The folders of this process's memory control groups and of their ancestors, from
    /proc/self/cgroup ("id:controllers:path" a line; v2's controllers are empty)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    folders = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers and "memory" not in controllers.split(","):
            continue
        root = Path("/sys/fs/cgroup/memory" if controllers else "/sys/fs/cgroup")
        group = root / path.lstrip("/")
        folders += [group, *[p for p in group.parents if p.is_relative_to(root)]]
    return folders


def process_memory() -> int:
    """Resident memory of this process (bytes), once the modules tasks import are loaded:
    a worker's baseline."""
    return psutil.Process().memory_info().rss
