"""Worker jobs on SLURM or PBS through dask-jobqueue, configured the dask way
(``jobqueue.<kind>.*`` in a jobqueue.yaml, see cluster/), and what the queue says of them."""

import subprocess
import warnings
from collections.abc import Sequence
from types import ModuleType

import dask

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError

JOBQUEUE_CLUSTERS = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}


def quiet_port_warning() -> None:
    """distributed warns when the dashboard's port is taken and picks another: the link
    printed once the client connects says where it is."""
    warnings.filterwarnings("ignore", message="Port .* is already in use")


def check_jobqueue(kind: str) -> ModuleType:
    """dask_jobqueue, once it is known to be installed and dask's configuration to say what
    a ``kind`` (slurm, pbs) job asks for: cores and memory; else CoronInputError, in one
    line."""
    try:
        import dask_jobqueue
    except ImportError:
        raise CoronInputError(
            f"--cluster {kind}", "needs dask-jobqueue: pip install 'coron-dask[hpc]'"
        ) from None
    missing = [key for key in ("cores", "memory") if not dask.config.get(f"jobqueue.{kind}.{key}")]
    if missing:
        raise CoronInputError(
            f"--cluster {kind}",
            f"dask's configuration has no jobqueue.{kind}.{' or '.join(missing)}: copy "
            "cluster/jobqueue.yaml to ~/.config/dask/ (or set DASK_CONFIG to its folder) and "
            "fill in your site's queue, cores and memory",
        )
    return dask_jobqueue


def jobqueue_cluster(kind: str, dashboard_address: str | None = None) -> object:
    """A dask-jobqueue cluster of ``kind`` (slurm, pbs) configured from dask's jobqueue config."""
    dask_jobqueue = check_jobqueue(kind)
    quiet_port_warning()
    options = dict(dask.config.get(f"jobqueue.{kind}.scheduler-options", None) or {})
    options.setdefault(
        "dashboard_address", dashboard_address or config.get("cluster.dashboard-address")
    )
    return getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[kind])(scheduler_options=options)


def start_jobs(
    kind: str, jobs: int | None, adapt: tuple[int, int] | None, dashboard_address: str
) -> object:
    """A jobqueue cluster of ``kind`` with ``jobs`` jobs submitted, or adapting between the
    ``adapt`` (minimum, maximum) jobs."""
    cluster = jobqueue_cluster(kind, dashboard_address)
    if adapt:
        cluster.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
    else:
        cluster.scale(jobs=jobs or 1)
    return cluster


def workers_per_job(kind: str) -> int:
    """The worker processes a ``kind`` job brings: ``jobqueue.<kind>.processes``, else
    dask-jobqueue's own default for its cores."""
    from distributed.deploy.utils import nprocesses_nthreads

    cores = dask.config.get(f"jobqueue.{kind}.cores", None) or 1
    return dask.config.get(f"jobqueue.{kind}.processes", None) or nprocesses_nthreads(cores)[0]


def queue_state(kind: str, job_ids: Sequence[str]) -> str:
    """The state of batch jobs ``job_ids`` as the queue reports it (squeue, qstat), e.g.
    "123 PENDING (Resources)"; what was submitted if the queue does not answer."""
    if not job_ids:
        return "none submitted yet"
    command = {
        "slurm": ["squeue", "--noheader", "--format=%i %T %r", "--jobs", ",".join(job_ids)],
        "pbs": ["qstat", *job_ids],
    }[kind]
    try:
        answer = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        answer = None
    lines = answer.stdout.strip().splitlines() if answer and answer.returncode == 0 else []
    if kind == "pbs":
        lines = [" ".join(line.split()[i] for i in (0, 4)) for line in lines[2:]]
    return "; ".join(lines) or f"{len(job_ids)} submitted ({', '.join(job_ids)})"
