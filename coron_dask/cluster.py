"""Where the graph runs and how: a LocalCluster started for the run, worker jobs on SLURM or
PBS through dask-jobqueue, an existing distributed scheduler (address or scheduler file), or
one of dask's local schedulers; computing the writes, with progress, a performance report,
a summary of where the time went, and one clear error when the cluster is lost."""

import concurrent.futures
import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence

import dask
from dask.delayed import Delayed

from coron_dask.chunking import Workers
from coron_dask.errors import ClusterError, CoronInputError
from coron_dask.memory import MALLOC

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("synchronous", "sync", "single-threaded", "threads", "threading")
#: Environment of LocalCluster workers. One BLAS thread per worker thread (dask runs one
#: task per thread). glibc malloc (``memory.MALLOC``, which the memory model counts on):
#: distributed's default MALLOC_TRIM_THRESHOLD_=65536 also pins the mmap threshold at
#: 128 KiB, so every FFT temporary is mapped and faulted in afresh, which halves the speed
#: of the shift fit; arrays under 32 MiB reuse the heap here, at most two heaps keep freed
#: memory, and no more than 32 MiB each.
WORKER_ENVIRON = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": str(MALLOC["MMAP_THRESHOLD"]),
    "MALLOC_TRIM_THRESHOLD_": str(MALLOC["TRIM_THRESHOLD"]),
    "MALLOC_ARENA_MAX": str(MALLOC["ARENA_MAX"]),
}


class Cluster:
    """Where the graph runs: a LocalCluster started for the run, a running distributed
    scheduler, or one of dask's local schedulers (``client`` is then None).

    ``scheduler`` is an address (``tcp://host:port``) or a local scheduler name
    (``synchronous``, ``threads``); with neither it nor ``scheduler_file`` a cluster of
    ``kind`` starts at once, in the background, while the caller goes on importing and
    checking its input; ``client`` waits for it. ``local`` is a LocalCluster of
    ``n_workers`` processes; ``slurm`` and ``pbs`` (started at once, in the foreground)
    submit worker jobs through dask-jobqueue, configured the dask way (``jobqueue.slurm.*``
    in a jobqueue.yaml, see cluster/), as ``jobs`` jobs or adaptively between ``adapt`` =
    (minimum, maximum) jobs. The dashboard
    is bound to ``dashboard_address``, loopback unless asked otherwise. Options left None
    take the configured defaults (``coron_dask.cluster.*``).

    Blocks are planned from the workers that have joined, so ``client`` first waits, up to
    ``coron_dask.cluster.worker-timeout`` seconds, until ``wait_for_workers`` workers have
    joined a running scheduler (default ``coron_dask.cluster.wait-for-workers``, 1) or a
    jobqueue cluster (default: the workers its jobs bring, ``jobs`` × processes per job, or
    those of the ``adapt`` minimum). A LocalCluster has its workers when it starts.
    """

    def __init__(
        self,
        scheduler: str | None = None,
        scheduler_file: str | None = None,
        *,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        memory_limit: str | float | None = None,
        dashboard_address: str | None = None,
        kind: str = "local",
        jobs: int | None = None,
        adapt: tuple[int, int] | None = None,
        quiet: bool = False,
        wait_for_workers: int | None = None,
    ) -> None:
        self.scheduler, self.scheduler_file, self.quiet = scheduler, scheduler_file, quiet
        self.kind = kind
        self.wait_for_workers = _workers_to_await(
            wait_for_workers, kind if not (scheduler or scheduler_file) else "local", jobs, adapt
        )
        #: worker threads the cluster will have once its batch jobs run (0: as connected)
        self.expected_threads = 0
        if kind != "local":
            cores = dask.config.get(f"jobqueue.{kind}.cores", None) or 1
            self.expected_threads = (adapt[1] if adapt else jobs or 1) * cores
        self._client: object | None = None
        self._local = None
        self._config = contextlib.ExitStack()
        if scheduler in LOCAL_SCHEDULERS:
            self._config.enter_context(dask.config.set(scheduler=scheduler))
        elif not (scheduler or scheduler_file):
            from coron_dask import config

            n_workers = n_workers or config.get("cluster.n-workers")
            threads_per_worker = threads_per_worker or config.get("cluster.threads-per-worker")
            memory_limit = memory_limit or config.get("cluster.memory-limit")
            dashboard_address = dashboard_address or config.get("cluster.dashboard-address")
            if kind != "local":  # dask-jobqueue needs the main thread (it sets signal handlers)
                self._local = concurrent.futures.Future()
                self._local.set_result(_jobqueue_cluster(kind, jobs, adapt, dashboard_address))
                return
            options = dict(
                n_workers=n_workers or max(1, (os.cpu_count() or 1) // threads_per_worker),
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=memory_limit,
                dashboard_address=dashboard_address,
                host="127.0.0.1",
            )
            self._local = concurrent.futures.ThreadPoolExecutor(1).submit(_local_cluster, options)

    @property
    def client(self) -> object | None:
        """The distributed Client, connecting (and waiting for a LocalCluster) on first use,
        then waiting for ``wait_for_workers`` workers of a running scheduler or jobqueue
        cluster to join: blocks are planned from the workers there are."""
        if self._client is None and self.scheduler not in LOCAL_SCHEDULERS:
            from distributed import Client
            from distributed.comm import CommClosedError

            try:
                if self._local is not None:
                    self._client = Client(self.deployment, set_as_default=False)
                else:
                    self._client = Client(
                        self.scheduler, scheduler_file=self.scheduler_file, set_as_default=False
                    )
                if not self.quiet:
                    link = self._client.dashboard_link
                    print(f"Dask dashboard: {link}", file=sys.stderr, flush=True)
                if self.kind != "local" or self._local is None:  # a LocalCluster has its workers
                    await_workers(self._client, self.wait_for_workers)
            except (OSError, CommClosedError) as error:  # not there, or gone while we waited
                raise ClusterError(f"cannot reach the scheduler ({error})") from None
        return self._client

    @property
    def deployment(self) -> object | None:
        """The LocalCluster or jobqueue cluster started for the run (None otherwise)."""
        return None if self._local is None else self._local.result()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._client is not None:
            self._client.close()
        if self._local is not None:
            with contextlib.suppress(Exception):
                self.deployment.close()
        self._config.close()


def _workers_to_await(
    wanted: int | None, kind: str, jobs: int | None, adapt: tuple[int, int] | None
) -> int:
    """How many workers to wait for before planning: ``wanted`` if given; for a jobqueue
    cluster of ``kind``, the workers its jobs bring (no more than the ``adapt`` minimum
    guarantees); otherwise ``coron_dask.cluster.wait-for-workers``."""
    if wanted is not None:
        return wanted
    if kind == "local":
        from coron_dask import config

        return int(config.get("cluster.wait-for-workers"))
    from distributed.deploy.utils import nprocesses_nthreads

    cores = dask.config.get(f"jobqueue.{kind}.cores", None) or 1
    processes = dask.config.get(f"jobqueue.{kind}.processes", None)
    processes = processes or nprocesses_nthreads(cores)[0]  # dask-jobqueue's own default
    return (adapt[0] if adapt else jobs or 1) * processes


def _joined(client: object) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def await_workers(client: object, count: int, timeout: float | str | None = None) -> None:
    """Wait until ``count`` workers have joined ``client``'s scheduler (0: no wait), for at
    most ``timeout`` (default ``coron_dask.cluster.worker-timeout``, seconds): workers
    started alongside the run (srun, pbsdsh, batch jobs) may still be starting, and a plan
    made without them sizes blocks for this machine. Raises ClusterError, in one line, if
    they do not all join in time."""
    if count < 1:
        return
    from dask.utils import parse_timedelta

    from coron_dask import config

    timeout = parse_timedelta(timeout or config.get("cluster.worker-timeout"), "s")
    address, start = client.scheduler.address, time.monotonic()
    joined = _joined(client)
    if joined < count:
        log.info("waiting for %s at %s: %d joined", _workers(count), address, joined)
        try:
            client.wait_for_workers(count, timeout=timeout)
        except TimeoutError:
            raise ClusterError(
                f"{_joined(client)} of {_workers(count)} joined {address} within {timeout:g} s "
                "(--wait-for-workers, coron_dask.cluster.worker-timeout)"
            ) from None
        joined = _joined(client)
    log.info(
        "%s joined %s (waited %.1f s for %d)",
        _workers(joined),
        address,
        time.monotonic() - start,
        count,
    )


def _quiet_port_warning() -> None:
    """distributed warns when the dashboard's port is taken and picks another: the link
    printed once the client connects says where it is."""
    warnings.filterwarnings("ignore", message="Port .* is already in use")


JOBQUEUE_CLUSTERS = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}


def jobqueue_cluster(kind: str, dashboard_address: str | None = None) -> object:
    """A dask-jobqueue cluster of ``kind`` (slurm, pbs) configured from dask's jobqueue config."""
    try:
        import dask_jobqueue
    except ImportError:
        raise CoronInputError(
            f"--cluster {kind}", "needs dask-jobqueue: pip install 'coron-dask[hpc]'"
        ) from None

    from coron_dask import config

    _quiet_port_warning()
    options = dict(dask.config.get(f"jobqueue.{kind}.scheduler-options", None) or {})
    options.setdefault(
        "dashboard_address", dashboard_address or config.get("cluster.dashboard-address")
    )
    return getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[kind])(scheduler_options=options)


def _jobqueue_cluster(
    kind: str, jobs: int | None, adapt: tuple[int, int] | None, dashboard_address: str
) -> object:
    cluster = jobqueue_cluster(kind, dashboard_address)
    if adapt:
        cluster.adapt(minimum_jobs=adapt[0], maximum_jobs=adapt[1])
    else:
        cluster.scale(jobs=jobs or 1)
    return cluster


def _local_cluster(options: dict) -> object:
    from distributed import LocalCluster

    _quiet_port_warning()
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_ENVIRON}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(**options)


def measure_workers(client: object | None) -> Workers:
    """The workers of the cluster ``client`` is connected to, as the block plan sees them:
    count, threads and memory limit of each (the smallest, for a mixed cluster) and the
    largest baseline measured on them. With dask's local schedulers (``client`` None):
    this process, with this machine's memory and cores. Workers without a memory limit
    get this machine's."""
    from distributed.comm import CommClosedError
    from distributed.system import MEMORY_LIMIT

    from coron_dask.workers import TrimAfterTasks, configure_memory, process_memory

    if client is None:
        threaded = dask.config.get("scheduler", None) in ("threads", "threading")
        threads = (os.cpu_count() or 1) if threaded else 1
        return Workers(1, threads, MEMORY_LIMIT, process_memory())
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        # what the memory model counts on, however the workers were started
        client.run(configure_memory)
        client.register_plugin(TrimAfterTasks(), name=TrimAfterTasks.name)
        baselines = client.run(process_memory)
    except (OSError, CommClosedError, KeyError):  # the scheduler went away while we asked
        raise ClusterError("lost the connection to the scheduler") from None
    threads = min(w["nthreads"] for w in info.values())
    limit = min(w["memory_limit"] or MEMORY_LIMIT for w in info.values())
    return Workers(len(info), threads, limit, max(baselines.values()))


#: Task-name fragments and the pipeline stage their time counts towards, first match wins.
STAGES = (
    ("align-fit", "align_refs: shift fit"),
    ("align-shift", "align_refs: shift"),
    ("fill-", "align_refs: bad-pixel fill"),
    ("klip", "klip"),
    ("outlier", "outlier_detection"),
    ("resample", "resample"),
    ("read-", "read calints"),
    ("store", "write products"),
)


def stage_of(task_prefix: str) -> str:
    """The pipeline stage a task belongs to, from its name."""
    return next((stage for part, stage in STAGES if part in task_prefix), "other")


def summarize_task_stream(records: list[dict]) -> dict:
    """Seconds and task counts per pipeline stage from a distributed task stream."""
    stages: dict[str, dict[str, float]] = {}
    for record in records:
        key = record["key"]
        prefix = (key if isinstance(key, str) else key[0]).rsplit("-", 1)[0]
        for period in record["startstops"]:
            if period["action"] != "compute":
                continue
            entry = stages.setdefault(stage_of(prefix), {"seconds": 0.0, "tasks": 0})
            entry["seconds"] += period["stop"] - period["start"]
            entry["tasks"] += 1
    return stages


def _lost(client: object) -> None:
    """Raise the one-line error of a lost scheduler, without distributed's reconnection
    attempts (it would retry for distributed.comm.timeouts.connect, logging each one)."""
    logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
    with contextlib.suppress(Exception):
        client.close(timeout=1)
    raise ClusterError("lost the connection to the scheduler") from None


def _cancel(client: object, futures: list) -> None:
    """Cancel ``futures`` and wait (a minute at most) until no task runs any more."""
    client.cancel(futures)
    deadline = time.monotonic() + 60
    with contextlib.suppress(Exception):
        while any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.1)


def _gather(client: object, futures: list) -> None:
    """Wait for ``futures``. A lost scheduler or a task that kills its workers raises
    ClusterError, in one line; any other failure is the task's own error, raised as it is.
    Either way the other tasks are cancelled and awaited first, so that none still writes
    into a product when the caller cleans up."""
    from distributed import KilledWorker
    from distributed.comm import CommClosedError

    try:
        client.gather(futures)
    except (concurrent.futures.CancelledError, CommClosedError):
        _lost(client)
    except OSError:
        if client.status != "running":  # the client's own connection, not a task's I/O
            _lost(client)
        _cancel(client, futures)
        raise
    except BaseException as error:
        _cancel(client, futures)
        if isinstance(error, KilledWorker):
            raise ClusterError(f"workers kept dying on task {error.task!r}") from None
        raise


def execute(
    writes: Sequence[Delayed],
    client: object | None,
    *,
    progress: bool = True,
    report: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
) -> None:
    """Compute ``writes`` together (shared inputs load once), with a progress bar if asked
    and the output is a terminal (a bar redrawn in a batch log is only noise).

    ``report`` saves dask's HTML performance report; ``stats`` a JSON summary: wall time,
    task seconds per stage, workers, and how many workers were lost during the run. Both
    need a distributed cluster; with dask's local schedulers ``stats`` holds the wall time
    only and no report is written.
    """
    progress = progress and sys.stderr.isatty()
    start = time.perf_counter()
    summary: dict = {}
    if client is None:
        with contextlib.ExitStack() as stack:
            if progress:
                from dask.diagnostics import ProgressBar

                stack.enter_context(ProgressBar(out=sys.stderr))
            dask.compute(*writes)
    else:
        from distributed import get_task_stream, performance_report
        from distributed import progress as show_progress

        before = client.scheduler_info(n_workers=-1)["workers"]
        with contextlib.ExitStack() as stack:
            # current for this run only: nothing of it stays in dask's global configuration
            stack.enter_context(client.as_current())
            if report:
                stack.enter_context(performance_report(filename=os.fspath(report)))
            stream = stack.enter_context(get_task_stream(client)) if stats else None
            try:
                futures = client.compute(list(writes))
            except OSError:
                if client.status == "running":
                    raise
                _lost(client)
            if progress:
                show_progress(futures)
                print(file=sys.stderr)
            _gather(client, futures)
        after = client.scheduler_info(n_workers=-1)["workers"]
        if stream is not None:
            summary = {
                "workers": len(after),
                "threads": sum(w["nthreads"] for w in after.values()),
                "memory_limit_per_worker": min(w["memory_limit"] for w in after.values()),
                "workers_lost": len(set(before) - set(after)),
                "stages": summarize_task_stream(stream.data),
            }
    if stats:
        summary["wall_seconds"] = time.perf_counter() - start
        with open(stats, "w") as handle:
            json.dump(summary, handle, indent=2)
