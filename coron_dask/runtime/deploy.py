"""Where the graph runs: a LocalCluster started for the run, worker jobs on SLURM or PBS
(``jobqueue``), an existing distributed scheduler (address or scheduler file), or one of
dask's local schedulers; the workers there as the block plan sees them."""

import concurrent.futures
import contextlib
import logging
import sys
from types import ModuleType

import dask
from dask.utils import format_bytes, parse_bytes

from coron_dask.core import config
from coron_dask.core.errors import ClusterError, CoronInputError, Interrupted
from coron_dask.planning.block_plan import Workers
from coron_dask.runtime import progress
from coron_dask.runtime.jobqueue import queue_state, start_jobs, workers_per_job
from coron_dask.runtime.resources import allocation, process_memory

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("synchronous", "sync", "single-threaded", "threads", "threading")
#: The names of dask's threaded scheduler (the other local ones run tasks one by one).
THREADED = ("threads", "threading")


def on_cluster() -> ModuleType:
    """The module that needs distributed (``connection``), imported when a run first uses a
    distributed cluster: a run on dask's local schedulers does without its 0.4 s."""
    from coron_dask.runtime import connection

    return connection


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
            # rechunks by tasks, as they must here: dask would import distributed (0.4 s)
            # only to find that no client is there to rechunk peer to peer
            local = {"scheduler": scheduler, "array.rechunk.method": "tasks"}
            if scheduler in THREADED:  # the allocation's CPUs, not the node's
                local["num_workers"] = local_threads()
            self._config.enter_context(dask.config.set(local))
        elif not (scheduler or scheduler_file):
            threads_per_worker = threads_per_worker or config.get("cluster.threads-per-worker")
            dashboard_address = dashboard_address or config.get("cluster.dashboard-address")
            if kind != "local":  # dask-jobqueue needs the main thread (it sets signal handlers)
                self._local = concurrent.futures.Future()
                self._local.set_result(start_jobs(kind, jobs, adapt, dashboard_address))
                return
            self._config.callback(_main_not_rerun())
            count, limit = local_cluster_size(n_workers, threads_per_worker, memory_limit)
            options = dict(
                n_workers=count,
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=limit,
                dashboard_address=dashboard_address,
                host="127.0.0.1",
            )
            start = on_cluster().start_local_cluster
            self._local = concurrent.futures.ThreadPoolExecutor(1).submit(start, options)

    @property
    def client(self) -> object | None:
        """The distributed Client, connecting (and waiting for a LocalCluster) on first use,
        then waiting for ``wait_for_workers`` workers of a running scheduler or jobqueue
        cluster to join: blocks are planned from the workers there are."""
        if self._client is None and self.scheduler not in LOCAL_SCHEDULERS:
            connection = on_cluster()
            try:
                if self._local is not None:
                    self._client = connection.Client(self.deployment, set_as_default=False)
                else:
                    self._client = connection.connect(self.scheduler, self.scheduler_file)
                client_log = logging.getLogger("distributed.client")
                client_log.addFilter(self._connected)
                self._config.callback(client_log.removeFilter, self._connected)
                if not self.quiet:
                    link = progress.link(self._client.dashboard_link)
                    print(f"Dask dashboard: {link}", file=sys.stderr, flush=True)
                if self.kind != "local" or self._local is None:  # a LocalCluster has its workers
                    connection.await_workers(
                        self._client, self.wait_for_workers, queue=self._queue_state
                    )
            except (OSError, connection.CommClosedError) as error:  # not there, or gone since
                raise ClusterError(f"cannot reach the scheduler ({error})") from None
        return self._client

    def _connected(self, _record: logging.LogRecord) -> bool:
        """A filter of distributed's client log: nothing while the connection is lost (its
        reconnection attempts), which the run reports in its own line."""
        return self._client is None or self._client.status == "running"

    def _queue_state(self) -> str:
        """What the batch jobs of a jobqueue cluster are doing, for the lines of a wait."""
        if self.kind == "local" or self._local is None:
            return ""
        ids = [job.job_id for job in self.deployment.workers.values() if job.job_id]
        return queue_state(self.kind, ids)

    @property
    def deployment(self) -> object | None:
        """The LocalCluster or jobqueue cluster started for the run (None otherwise)."""
        return None if self._local is None else self._local.result()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, _tb: object) -> None:
        lost = (
            error is not None
            and not isinstance(error, ClusterError | CoronInputError | Interrupted)
            and self._client is not None
            and self._client.status != "running"
        )
        # the run has said how it ended: what dask logs as it shuts down is noise (tasks
        # cancelled, heartbeats to a scheduler already closed, reconnection attempts)
        levels = {name: logging.getLogger(name).level for name in CLUSTER_LOGGERS}
        quiet_distributed()
        if self._client is not None and not lost and self._local is not None:
            with contextlib.suppress(Exception):
                self._client.run(quiet_distributed)  # our own workers, about to close
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=5 if lost else None)
        if self._local is not None:
            with contextlib.suppress(Exception):
                self.deployment.close()
        self._config.close()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if lost:  # whatever failed on the way (a graph sent, a worker list asked for)
            raise ClusterError("lost the connection to the scheduler") from None


def in_process(
    data_bytes: int | None,
    *,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    memory_limit: str | float | None = None,
    kind: str = "local",
    report: object = None,
    **_where: object,
) -> bool:
    """Whether a run whose data (inputs and aligned frames) come to ``data_bytes`` computes
    in this process, on dask's threaded scheduler (numpy's FFTs and products release the
    GIL), rather than on a LocalCluster started for it: yes when nothing asks for a
    cluster (a scheduler, worker processes or their memory limit, batch jobs, a performance
    report) and the data come to less than ``coron_dask.cluster.in-process-below``. Worker
    processes take seconds to start, longer than such a run computes."""
    below = config.get("cluster.in-process-below")
    asked = scheduler or scheduler_file or n_workers or config.get("cluster.n-workers")
    if below is None or data_bytes is None or asked or memory_limit or kind != "local" or report:
        return False
    if data_bytes >= parse_bytes(below):
        return False
    log.info(
        "cluster: %s of data, less than coron_dask.cluster.in-process-below (%s): computing "
        "in this process on %s, no worker processes to start (--n-workers starts "
        "a LocalCluster and its dashboard)",
        format_bytes(data_bytes),
        below,
        _threads_said(),
    )
    return True


def local_threads() -> int:
    """The threads of dask's threaded scheduler in this process: dask's ``num_workers``
    if set, else the allocation's CPUs (``resources.allocation``)."""
    return dask.config.get("num_workers", None) or allocation().cpus


def _threads_said() -> str:
    if dask.config.get("num_workers", None):
        return f"{local_threads()} threads (dask's num_workers)"
    found = allocation()
    return f"{found.cpus} thread(s) from {found.cpus_from}"


def local_worker_count(n_workers: int | None = None, threads_per_worker: int | None = None) -> int:
    """The worker processes of the LocalCluster a run starts: ``n_workers``, else the
    setting ``coron_dask.cluster.n-workers``, else as many as the allocation's CPUs
    (``resources.allocation``: affinity, control groups, the batch job) give threads."""
    threads = threads_per_worker or config.get("cluster.threads-per-worker")
    return n_workers or config.get("cluster.n-workers") or max(1, allocation().cpus // threads)


def worker_memory_limit(count: int, memory_limit: str | float | None = None) -> str | float:
    """The memory limit of each of ``count`` LocalCluster workers: ``memory_limit``, else
    the setting ``coron_dask.cluster.memory-limit``; "auto" shares the allocation's memory
    (``resources.allocation``) among them, where distributed's "auto" would share the
    node's."""
    limit = memory_limit or config.get("cluster.memory-limit")
    return allocation().memory // count if limit == "auto" else limit


def local_cluster_size(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float | None = None,
) -> tuple[int, str | float]:
    """The LocalCluster's worker count and each worker's memory limit (``local_worker_count``,
    ``worker_memory_limit``), logging where each came from."""
    found = allocation()
    count = local_worker_count(n_workers, threads_per_worker)
    threads = threads_per_worker or config.get("cluster.threads-per-worker")
    if n_workers or config.get("cluster.n-workers"):
        counted = "--n-workers" if n_workers else "coron_dask.cluster.n-workers"
    else:
        counted = f"{found.cpus_from}, {threads} thread(s) each"
    limit = worker_memory_limit(count, memory_limit)
    if (memory_limit or config.get("cluster.memory-limit")) == "auto":
        shared = f"{found.memory_from} ({format_bytes(found.memory)} / {count})"
        limit_said = format_bytes(limit)
    else:
        shared = "--memory-limit" if memory_limit else "coron_dask.cluster.memory-limit"
        limit_said = str(limit)
    log.info("cluster: %d worker(s) from %s; %s each from %s", count, counted, limit_said, shared)
    return count, limit


#: The loggers of a cluster's machinery: distributed's, and the event loop's under it
#: (tornado logs a callback that failed, e.g. a job scaled while the cluster closes).
CLUSTER_LOGGERS = ("distributed", "tornado", "asyncio")


def quiet_distributed() -> None:
    """Log only the cluster machinery's critical messages in this process: a run that is
    ending (cancelled tasks, connections closing, reconnection attempts) has said why."""
    for name in CLUSTER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _workers_to_await(
    wanted: int | None, kind: str, jobs: int | None, adapt: tuple[int, int] | None
) -> int:
    """How many workers to wait for before planning: ``wanted`` if given; for a jobqueue
    cluster of ``kind``, the workers its jobs bring (no more than the ``adapt`` minimum
    guarantees); otherwise ``coron_dask.cluster.wait-for-workers``."""
    if wanted is not None:
        return wanted
    if kind == "local":
        return int(config.get("cluster.wait-for-workers"))
    return (adapt[0] if adapt else jobs or 1) * workers_per_job(kind)


def _main_not_rerun():
    """Keep the worker processes of a LocalCluster from running the user's script again:
    multiprocessing starts them fresh ("spawn") and, where the script's ``__main__`` has a
    file, runs it first, so a script calling ``run_coron3`` at its top would start another
    cluster in every worker. Workers need coron_dask's functions only; the file is hidden
    from multiprocessing while the cluster lives (restarted workers included). Returns the
    function that shows it again."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        return lambda: None  # a notebook, ``python -m``: nothing is run again
    del main.__file__

    def restore() -> None:
        main.__file__ = path

    return restore


def measure_workers(client: object | None) -> Workers:
    """The workers of the cluster ``client`` is connected to, as the block plan sees them:
    count, threads and memory limit of each (the smallest, for a mixed cluster) and the
    largest baseline measured on them. With dask's local schedulers (``client`` None):
    this process, with the allocation's memory and CPUs (``resources.allocation``). Workers
    without a memory limit get this process's allocation's memory."""
    if client is None:  # no distributed to import
        threads = local_threads() if dask.config.get("scheduler", None) in THREADED else 1
        return Workers(1, threads, allocation().memory, process_memory())
    return on_cluster().measure_cluster(client)
