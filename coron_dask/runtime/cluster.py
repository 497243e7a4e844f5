"""Where the graph runs and how: a LocalCluster started for the run, worker jobs on SLURM or
PBS through dask-jobqueue, an existing distributed scheduler (address or scheduler file), or
one of dask's local schedulers; computing the writes, with progress, a performance report,
a summary of where the time went, and one clear error when the cluster is lost."""

import concurrent.futures
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import dask
import dask.local
import dask.threaded

from coron_dask.core.errors import ClusterError, CoronInputError, Interrupted
from coron_dask.planning.block_plan import Workers
from coron_dask.planning.memory import MALLOC, process_memory, system_memory
from coron_dask.runtime import progress as dashboard

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
            # rechunks by tasks, as they must here: dask would import distributed (0.4 s)
            # only to find that no client is there to rechunk peer to peer
            local = {"scheduler": scheduler, "array.rechunk.method": "tasks"}
            self._config.enter_context(dask.config.set(local))
        elif not (scheduler or scheduler_file):
            from coron_dask.core import config

            threads_per_worker = threads_per_worker or config.get("cluster.threads-per-worker")
            memory_limit = memory_limit or config.get("cluster.memory-limit")
            dashboard_address = dashboard_address or config.get("cluster.dashboard-address")
            if kind != "local":  # dask-jobqueue needs the main thread (it sets signal handlers)
                self._local = concurrent.futures.Future()
                self._local.set_result(_jobqueue_cluster(kind, jobs, adapt, dashboard_address))
                return
            self._config.callback(_main_not_rerun())
            options = dict(
                n_workers=local_worker_count(n_workers, threads_per_worker),
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
                    self._client = connect(self.scheduler, self.scheduler_file)
                client_log = logging.getLogger("distributed.client")
                client_log.addFilter(self._connected)
                self._config.callback(client_log.removeFilter, self._connected)
                if not self.quiet:
                    link = dashboard.link(self._client.dashboard_link)
                    print(f"Dask dashboard: {link}", file=sys.stderr, flush=True)
                if self.kind != "local" or self._local is None:  # a LocalCluster has its workers
                    await_workers(self._client, self.wait_for_workers, queue=self._queue_state)
            except (OSError, CommClosedError) as error:  # not there, or gone while we waited
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


def _seconds(setting: str, given: float | str | None = None) -> float:
    """``given``, else the setting ``coron_dask.runtime.cluster.<setting>``, in seconds."""
    from dask.utils import parse_timedelta

    from coron_dask.core import config

    return parse_timedelta(given or config.get(f"cluster.{setting}"), "s")


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
    from dask.utils import format_bytes, parse_bytes

    from coron_dask.core import config

    below = config.get("cluster.in-process-below")
    asked = scheduler or scheduler_file or n_workers or config.get("cluster.n-workers")
    if below is None or data_bytes is None or asked or memory_limit or kind != "local" or report:
        return False
    if data_bytes >= parse_bytes(below):
        return False
    log.info(
        "cluster: %s of data, less than coron_dask.cluster.in-process-below (%s): computing "
        "in this process on %d threads, no worker processes to start (--n-workers starts "
        "a LocalCluster and its dashboard)",
        format_bytes(data_bytes),
        below,
        os.cpu_count() or 1,
    )
    return True


def local_worker_count(n_workers: int | None = None, threads_per_worker: int | None = None) -> int:
    """The worker processes of the LocalCluster a run starts: ``n_workers``, else the
    setting ``coron_dask.cluster.n-workers``, else as many as the cores give threads."""
    from coron_dask.core import config

    threads = threads_per_worker or config.get("cluster.threads-per-worker")
    return n_workers or config.get("cluster.n-workers") or max(1, (os.cpu_count() or 1) // threads)


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
        from coron_dask.core import config

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


def await_workers(
    client: object,
    count: int,
    timeout: float | str | None = None,
    queue: Callable[[], str] | None = None,
) -> None:
    """Wait until ``count`` workers have joined ``client``'s scheduler (0: no wait), for at
    most ``timeout`` (default ``coron_dask.cluster.worker-timeout``, seconds): workers
    started alongside the run (srun, pbsdsh, batch jobs) may still be starting, and a plan
    made without them sizes blocks for this machine. Says what it waits for, and again
    every ``coron_dask.cluster.status-interval`` seconds, with ``queue()`` (what the batch
    jobs are doing) if given. Raises ClusterError, in one line, if they do not all join in
    time."""
    if count < 1:
        return
    timeout, interval = _seconds("worker-timeout", timeout), _seconds("status-interval")
    address, start = client.scheduler.address, time.monotonic()
    deadline = start + timeout

    def state() -> str:
        jobs = queue() if queue else ""
        return f"{_joined(client)} joined" + (f"; batch jobs: {jobs}" if jobs else "")

    if _joined(client) < count:
        log.info("waiting up to %g s for %s at %s: %s", timeout, _workers(count), address, state())
        while True:
            left = deadline - time.monotonic()
            try:
                client.wait_for_workers(count, timeout=max(0.1, min(interval, left)))
                break
            except TimeoutError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterError(
                        f"{_joined(client)} of {_workers(count)} joined {address} within "
                        f"{timeout:g} s (--wait-for-workers, coron_dask.cluster.worker-timeout)"
                    ) from None
                log.info("still waiting for %s (%.0f s left): %s", _workers(count), left, state())
    log.info(
        "%s joined %s (waited %.1f s for %d)",
        _workers(_joined(client)),
        address,
        time.monotonic() - start,
        count,
    )


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


def _scheduler_address(scheduler_file: str, timeout: float) -> str:
    """The address in ``scheduler_file``, waiting up to ``timeout`` seconds for the file to
    appear (a scheduler started alongside the run writes it when it is up)."""
    path, deadline = Path(scheduler_file), time.monotonic() + timeout
    if not path.exists():
        log.info("waiting up to %g s for the scheduler file %s", timeout, path)
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return json.loads(path.read_text())["address"]  # ValueError: being written
        if time.monotonic() > deadline:
            raise ClusterError(
                f"{path}: no scheduler wrote its address there within {timeout:g} s "
                "(--scheduler-file, coron_dask.cluster.scheduler-timeout)"
            )
        time.sleep(0.2)


@contextlib.contextmanager
def _said_if_slow(message: str, after: float = 2.0) -> Iterator[None]:
    """Log ``message`` if the block takes longer than ``after`` seconds."""
    timer = threading.Timer(after, log.info, (message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def connect(scheduler: str | None, scheduler_file: str | None = None) -> object:
    """A Client of the scheduler at ``scheduler`` (or in ``scheduler_file``), waiting up to
    ``coron_dask.cluster.scheduler-timeout`` seconds for it, and saying so if it takes
    long. Raises ClusterError, in one line, if no scheduler answers."""
    from distributed import Client

    timeout = _seconds("scheduler-timeout")
    address = _scheduler_address(scheduler_file, timeout) if scheduler_file else scheduler
    option = "--scheduler-file" if scheduler_file else "--scheduler"
    with _said_if_slow(f"connecting to the scheduler at {address} (up to {timeout:g} s)"):
        try:
            return Client(address, timeout=timeout, set_as_default=False)
        except OSError:
            raise ClusterError(
                f"no scheduler answered at {address} within {timeout:g} s "
                f"({option}, coron_dask.cluster.scheduler-timeout)"
            ) from None


def _quiet_port_warning() -> None:
    """distributed warns when the dashboard's port is taken and picks another: the link
    printed once the client connects says where it is."""
    warnings.filterwarnings("ignore", message="Port .* is already in use")


JOBQUEUE_CLUSTERS = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}


def check_jobqueue(kind: str) -> None:
    """Raise CoronInputError, in one line, unless dask-jobqueue is installed and dask's
    configuration says what a ``kind`` (slurm, pbs) job asks for: cores and memory."""
    try:
        import dask_jobqueue  # noqa: F401
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


def jobqueue_cluster(kind: str, dashboard_address: str | None = None) -> object:
    """A dask-jobqueue cluster of ``kind`` (slurm, pbs) configured from dask's jobqueue config."""
    check_jobqueue(kind)
    import dask_jobqueue

    from coron_dask.core import config

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


def _local_cluster(options: dict) -> object:
    from distributed import LocalCluster

    _quiet_port_warning()
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_ENVIRON}
    preload = [*dask.config.get("distributed.worker.preload"), "coron_dask.runtime.workers"]
    settings = {
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.worker.preload": preload,
    }
    with dask.config.set(settings):
        return LocalCluster(**options)


def measure_workers(client: object | None) -> Workers:
    """The workers of the cluster ``client`` is connected to, as the block plan sees them:
    count, threads and memory limit of each (the smallest, for a mixed cluster) and the
    largest baseline measured on them. With dask's local schedulers (``client`` None):
    this process, with this machine's memory and cores. Workers without a memory limit
    get this machine's."""
    if client is None:  # no distributed to import
        threads = (os.cpu_count() or 1) if _threaded() else 1
        return Workers(1, threads, system_memory(), process_memory())
    from distributed.comm import CommClosedError

    from coron_dask.runtime.workers import TrimAfterTasks, configure_memory

    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        # what the memory model counts on, however the workers were started
        client.run(configure_memory)
        client.register_plugin(TrimAfterTasks(), name=TrimAfterTasks.name)
        baselines = client.run(process_memory)
    except (OSError, CommClosedError, KeyError):  # the scheduler went away while we asked
        raise ClusterError("lost the connection to the scheduler") from None
    threads = min(w["nthreads"] for w in info.values())
    limit = min(w["memory_limit"] or system_memory() for w in info.values())
    return Workers(len(info), threads, limit, max(baselines.values()))


#: The steps' task names (``dashboard.by_step``) and the stage of ``--stats`` their time
#: counts towards, first match wins.
STAGES = (
    ("align_refs-fit", "align_refs: shift fit"),
    ("align_refs-shift", "align_refs: shift"),
    ("align_refs-fill", "align_refs: bad-pixel fill"),
    ("klip", "klip"),
    ("outlier_detection", "outlier_detection"),
    ("resample", "resample"),
    ("read-", "read calints"),
    ("write_", "write products"),
)


def stage_of(task_prefix: str) -> str:
    """The pipeline stage a task belongs to, from its name."""
    return next((stage for part, stage in STAGES if task_prefix.startswith(part)), "other")


def summarize_task_stream(records: list[dict]) -> dict:
    """Per pipeline stage, from a task stream: the seconds of its tasks and of dask's
    operations feeding them, the number of its own tasks (one fit per alignment block) and
    of those operations."""
    from dask.utils import key_split

    stages: dict[str, dict[str, float]] = {}
    for record in records:
        prefix = key_split(record["key"])
        own = dashboard.operation(record["key"]) is None
        for period in record["startstops"]:
            if period["action"] != "compute":
                continue
            entry = stages.setdefault(
                stage_of(prefix), {"seconds": 0.0, "tasks": 0, "dask_tasks": 0}
            )
            entry["seconds"] += period["stop"] - period["start"]
            entry["tasks" if own else "dask_tasks"] += 1
    return stages


def _cancel(client: object, futures: list) -> None:
    """Cancel ``futures`` and wait (``coron_dask.cluster.cancel-timeout`` at most) until no
    task runs any more, so that none still writes into a product being removed."""
    client.cancel(futures)
    deadline = time.monotonic() + _seconds("cancel-timeout")
    with contextlib.suppress(Exception):
        while any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.1)


def _gather(client: object, futures: list, lines: "dashboard.Lines | None" = None) -> None:
    """Wait for ``futures``, showing progress per step on ``lines`` if given (in Jupyter,
    distributed's widget). A task that kills its workers raises ClusterError, in one line;
    any other failure (a task's own error, a signal, the scheduler lost: ``Cluster`` says
    so) is raised as it is, after the other tasks are cancelled and awaited. The progress
    display never ends a run itself."""
    from distributed import KilledWorker

    try:
        if lines is not None:
            try:
                if dashboard.in_jupyter():
                    dashboard.widget(futures)
                else:
                    dashboard.watch(futures, lines)
            except Exception:  # its own connection lost: the gather says what happened
                log.debug("progress display ended early", exc_info=True)
        client.gather(futures)
    except BaseException as error:
        if client.status == "running":
            _cancel(client, futures)
        if isinstance(error, KilledWorker):
            raise ClusterError(f"workers kept dying on task {error.task!r}") from None
        raise


class _LocalWatch:
    """A dask callback for the local schedulers: progress lines per step, and each task's
    compute period in the form of distributed's task stream (for ``stats``)."""

    def __init__(self, lines: dashboard.Lines | None) -> None:
        from dask.callbacks import Callback

        self.lines, self.records, self.started = lines, [], {}
        self.everything: dict[str, int] = {}
        self.remaining: dict[str, int] = {}
        self.callback = Callback(
            start_state=self._start, pretask=self._pretask, posttask=self._posttask
        )

    def _start(self, dsk: dict, state: dict) -> None:
        from dask.utils import key_split

        for key in dsk:
            if key in state["cache"]:  # data (an array read lazily), never run as a task
                continue
            group = key_split(key)
            self.everything[group] = self.everything.get(group, 0) + 1
        self.remaining = dict(self.everything)

    def _pretask(self, key: object, _dsk: dict, _state: dict) -> None:
        self.started[key] = time.time()

    def _posttask(self, key: object, _result: object, _dsk: dict, state: dict, _id: int) -> None:
        from dask.utils import key_split

        stop = time.time()
        period = {"action": "compute", "start": self.started.pop(key, stop), "stop": stop}
        self.records.append({"key": key, "startstops": [period]})
        if self.lines is not None:
            self.remaining[key_split(key)] -= 1
            finished = not any(self.remaining.values())
            self.lines.show(dashboard.summary(self.remaining, self.everything), finished)


def _threaded() -> bool:
    """Whether the local scheduler configured is dask's threaded one (else synchronous)."""
    return dask.config.get("scheduler", None) in ("threads", "threading")


def _one_blas_thread_per_task() -> contextlib.AbstractContextManager:
    """Under dask's local schedulers, BLAS (the fit's and KLIP's matrix products) on one
    thread per task, as distributed's worker processes have it: a product's last bits
    can change with the number of BLAS threads (rows split differently), and the products
    are the same wherever they are computed; and BLAS's own threads on top of the
    threaded scheduler's oversubscribe the cores (KLIP took 1.6 times as long)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def execute(
    writes: Sequence[object],
    client: object | None,
    *,
    progress: bool = True,
    report: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
) -> None:
    """Compute ``writes`` (dask collections) together, shared inputs loaded once, their
    tasks named after the steps (``dashboard.by_step``), showing progress per step if
    asked: bars on a terminal, lines in a batch log, distributed's widget in Jupyter.

    ``report`` saves dask's HTML performance report (a distributed cluster only); ``stats``
    a JSON summary: wall time, task seconds per stage and, on a distributed cluster, its
    workers and how many were lost during the run.
    """
    lines = dashboard.Lines(_seconds("status-interval")) if progress else None
    start = time.perf_counter()
    run = dashboard.by_step(writes)  # tasks named after the steps, as the dashboard shows
    summary: dict = {}
    if client is None:
        watch = _LocalWatch(lines)
        # the scheduler's function, not its name: for a name dask imports distributed
        # (0.4 s) to look for a client first
        get = dask.threaded.get if _threaded() else dask.local.get_sync
        with watch.callback, _one_blas_thread_per_task():
            dask.compute(run, optimize_graph=False, scheduler=get)
        summary["stages"] = summarize_task_stream(watch.records)
    else:
        from distributed import get_task_stream, performance_report

        before = client.scheduler_info(n_workers=-1)["workers"]
        with contextlib.ExitStack() as stack:
            # current for this run only: nothing of it stays in dask's global configuration
            stack.enter_context(client.as_current())
            if report:
                stack.enter_context(performance_report(filename=os.fspath(report)))
            stream = stack.enter_context(get_task_stream(client)) if stats else None
            futures = [client.compute(run, optimize_graph=False)]
            _gather(client, futures, lines)
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
