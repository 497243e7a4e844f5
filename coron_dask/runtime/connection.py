"""What needs distributed (0.4 s to import), in the one module that imports it, itself
imported only when a run uses a distributed cluster: connecting, starting a LocalCluster,
waiting for workers, measuring them, checking that they see the run's folders (one
shared filesystem), and following a computation (progress per step from
a scheduler plugin of ours, the signals' record, cancellation)."""

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import dask
from distributed import (
    Client,
    KilledWorker,
    LocalCluster,
    get_task_stream,
    performance_report,
    progress,
    wait,
)
from distributed.comm import CommClosedError
from distributed.diagnostics.plugin import SchedulerPlugin

from coron_dask.core.errors import ClusterError, CoronInputError, raise_if_stopped
from coron_dask.io.resume import SHARED_TOKEN, writer
from coron_dask.planning.block_plan import Workers
from coron_dask.planning.memory import MALLOC
from coron_dask.runtime import progress as steps
from coron_dask.runtime.jobqueue import quiet_port_warning
from coron_dask.runtime.resources import allocation, process_memory
from coron_dask.runtime.settings import seconds
from coron_dask.runtime.workers import (
    SHARED_TOPIC,
    SharedFolderCheck,
    TrimAfterTasks,
    configure_memory,
    not_seen,
    shared_view,
)

log = logging.getLogger(__name__)

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
        raise_if_stopped()
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


def connect(scheduler: str | None, scheduler_file: str | None = None) -> Client:
    """A Client of the scheduler at ``scheduler`` (or in ``scheduler_file``), waiting up to
    ``coron_dask.cluster.scheduler-timeout`` seconds for it, and saying so if it takes
    long. Raises ClusterError, in one line, if no scheduler answers."""
    timeout = seconds("scheduler-timeout")
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


def _joined(client: object) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


#: Seconds the waits for a scheduler or workers last between two looks at the signals.
SPELL = 0.5


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
    timeout, interval = seconds("worker-timeout", timeout), seconds("status-interval")
    address, start = client.scheduler.address, time.monotonic()
    deadline = start + timeout

    def state() -> str:
        jobs = queue() if queue else ""
        return f"{_joined(client)} joined" + (f"; batch jobs: {jobs}" if jobs else "")

    if _joined(client) < count:
        log.info("waiting up to %g s for %s at %s: %s", timeout, _workers(count), address, state())
        said = time.monotonic()
        while True:
            left = deadline - time.monotonic()
            try:  # in short spells: a signal recorded meanwhile ends the wait
                client.wait_for_workers(count, timeout=max(0.1, min(SPELL, left)))
                break
            except TimeoutError:
                raise_if_stopped()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterError(
                        f"{_joined(client)} of {_workers(count)} joined {address} within "
                        f"{timeout:g} s (--wait-for-workers, coron_dask.cluster.worker-timeout)"
                    ) from None
                if time.monotonic() - said >= interval:
                    said = time.monotonic()
                    log.info(
                        "still waiting for %s (%.0f s left): %s", _workers(count), left, state()
                    )
    log.info(
        "%s joined %s (waited %.1f s for %d)",
        _workers(_joined(client)),
        address,
        time.monotonic() - start,
        count,
    )


def start_local_cluster(options: dict) -> LocalCluster:
    """A LocalCluster of ``options`` whose workers allocate as the memory model counts
    (``WORKER_ENVIRON``) and run ``workers.dask_setup`` as they start."""
    quiet_port_warning()
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_ENVIRON}
    preload = [*dask.config.get("distributed.worker.preload"), "coron_dask.runtime.workers"]
    settings = {
        "distributed.nanny.pre-spawn-environ": environ,
        "distributed.worker.preload": preload,
    }
    with dask.config.set(settings):
        return LocalCluster(**options)


def measure_cluster(client: Client) -> Workers:
    """The workers of ``client``'s cluster as the block plan sees them (see
    ``deploy.measure_workers``), once they allocate as the memory model counts."""
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        # what the memory model counts on, however the workers were started
        client.run(configure_memory)
        client.register_plugin(TrimAfterTasks(), name=TrimAfterTasks.name)
        baselines = client.run(process_memory)
    except (OSError, CommClosedError, KeyError):  # the scheduler went away while we asked
        raise ClusterError("lost the connection to the scheduler") from None
    threads = min(w["nthreads"] for w in info.values())
    limit = min(w["memory_limit"] or allocation().memory for w in info.values())
    return Workers(len(info), threads, limit, max(baselines.values()))


@contextlib.contextmanager
def shared_folder(
    client: Client, output_dir: str | Path, members: Sequence[str | Path] = ()
) -> Iterator[Callable[[], None]]:
    """Check, before anything is computed, that every worker sees the output folder at the
    same absolute path (reads a hidden token file of random content written there, writes
    there) and can read the input files ``members``: workers write partial and scratch
    files there and read references back. Raises CoronInputError, one line naming each
    worker that does not (address, host). Workers that join later check as they start
    (``SharedFolderCheck``): yields what raises ClusterError if one did not. The token
    (kept for them), and folders made for a failed run, are removed whatever happens."""
    given, folder = str(output_dir), Path(os.path.abspath(output_dir))  # as workers see it
    made = [path for path in (folder, *folder.parents) if not path.exists()]
    token = folder / f"{SHARED_TOKEN}{writer()}.{secrets.token_hex(8)}"
    members = tuple(str(Path(member).resolve()) for member in members)
    view = (str(folder), given, token.name, secrets.token_hex(16), members)
    registered = done = False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        token.write_text(view[3])
        try:
            seen = client.run(shared_view, *view, on_error="return")
        except (OSError, CommClosedError):
            raise ClusterError("lost the connection to the scheduler") from None
        if refused := not_seen(seen):
            raise CoronInputError(
                folder,
                f"the output folder is not seen at this path by {len(refused)} of "
                f"{_workers(len(seen))} (products need one filesystem all workers share): "
                + "; ".join(refused),
            )
        every = "the" if len(seen) == 1 else "all"
        inputs = f" and its {len(members)} input files" if members else ""
        log.info("output folder %s%s seen by %s %s", folder, inputs, every, _workers(len(seen)))
        client.register_plugin(SharedFolderCheck(*view), name=SHARED_TOPIC)
        registered = True
        yield lambda: _late_workers(client, folder, token.name)
        done = True
    finally:
        if registered and client.status == "running":
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(SHARED_TOPIC)
        token.unlink(missing_ok=True)
        for path in made if not done else ():
            with contextlib.suppress(OSError):  # deepest first; one that holds anything stays
                path.rmdir()


def _late_workers(client: Client, folder: Path, token: str) -> None:
    """Raise ClusterError if workers that joined during the run do not see ``folder``."""
    late = []
    with contextlib.suppress(Exception):  # the scheduler is gone: the run says so
        late = [e for _, e in client.get_events(SHARED_TOPIC) if e.get("token") == token]
    if late:
        raise ClusterError(  # what they wrote went elsewhere: nothing is kept
            f"{folder}: the output folder is not seen at this path by {_workers(len(late))} "
            "that joined during the run: " + "; ".join(event["seen"] for event in late),
            resumable=False,
        )


class StepCounts(SchedulerPlugin):
    """A scheduler plugin: the tasks of each step (``progress.labels``) the graphs sent
    while it is registered hold, and how many of them have finished."""

    name = "coron-dask-steps"

    def __init__(self) -> None:
        self.tally = steps.Tally()

    def update_graph(self, scheduler: object, *, tasks: Sequence = (), **_: object) -> None:
        known = scheduler.tasks
        self.tally.add(
            {key: {d.key for d in known[key].dependencies} for key in tasks if key in known}
        )

    def transition(self, key: object, start: str, finish: str, *args: object, **_: object) -> None:
        if finish == "memory" and start == "processing":
            self.tally.finished(key)


def _counts(dask_scheduler: object, name: str = StepCounts.name) -> tuple[dict, dict]:
    tally = dask_scheduler.plugins[name].tally
    return dict(tally.done), dict(tally.totals)


def _labels(dask_scheduler: object, name: str = StepCounts.name) -> dict:
    return dict(dask_scheduler.plugins[name].tally.steps)


def cancel(client: Client, futures: list) -> None:
    """Cancel ``futures`` and wait (``coron_dask.cluster.cancel-timeout`` at most) until no
    task runs any more, so that none still writes into a product being removed."""
    client.cancel(futures)
    deadline = time.monotonic() + seconds("cancel-timeout")
    with contextlib.suppress(Exception):
        while any(client.processing().values()) and time.monotonic() < deadline:
            time.sleep(0.1)


def _shown(client: Client, lines: "steps.Lines | None", finished: bool = False) -> bool:
    """Show the steps' counts on ``lines``; False once they cannot be had (the plugin is
    not on the scheduler, or the connection is lost: the waiting says what happened)."""
    if lines is None:
        return False
    try:
        done, totals = client.run_on_scheduler(_counts)
    except Exception:
        log.debug("progress display ended early", exc_info=True)
        return False
    lines.show(steps.summary(done, totals), finished)
    return True


def follow(
    client: Client, writes: Sequence[object], lines: "steps.Lines | None", labels: bool = False
) -> dict:
    """Compute ``writes`` on ``client``, waiting in short spells: between them, a signal
    the run received (``errors.raise_if_stopped``) ends it, and ``lines`` (if given) show
    the progress per step; in Jupyter, distributed's widget does. A task that kills its
    workers raises ClusterError, in one line; any other failure (a task's own error, a
    signal, the scheduler lost: ``Cluster`` says so) is raised as it is, after the other
    tasks are cancelled and awaited. Returns the step of every task if ``labels`` (what
    ``--stats`` needs), else nothing. The scheduler counts the steps only when the bars or
    the labels are wanted."""
    widget = lines is not None and steps.in_jupyter()
    if widget:
        lines = None
    counting = lines is not None or labels
    if counting:
        try:
            client.register_plugin(StepCounts(), name=StepCounts.name)
        except Exception:  # a scheduler without coron_dask: the run goes on without bars
            log.debug("no progress per step from this scheduler", exc_info=True)
            counting = False
    futures = []
    try:
        futures = client.compute(list(writes))
        if widget:
            display_widget(futures)
        showing = counting and lines is not None
        while True:
            try:
                wait(futures, timeout=0.2)
                break
            except TimeoutError:
                if any(future.status == "error" for future in futures):
                    break  # gather raises it
            raise_if_stopped()
            if showing:
                showing = _shown(client, lines)
        raise_if_stopped()
        client.gather(futures)
        if showing:
            _shown(client, lines, finished=True)
        return client.run_on_scheduler(_labels) if counting and labels else {}
    except BaseException as error:
        if client.status == "running" and futures:
            cancel(client, futures)
        if isinstance(error, KilledWorker):
            raise ClusterError(f"workers kept dying on task {error.task!r}") from None
        raise
    finally:
        if lines is not None:
            lines.close()
        if counting and client.status == "running":
            with contextlib.suppress(Exception):
                client.unregister_scheduler_plugin(StepCounts.name)


def display_widget(futures: list) -> None:
    """Show distributed's progress widget for ``futures`` in the notebook: a bar per task
    group (named after the steps)."""
    from IPython.display import display

    display(progress(futures, notebook=True, multi=True, complete=True))


@contextlib.contextmanager
def recorded(client: Client, report: str | None, stream: bool) -> Iterator[object]:
    """While computing: dask's HTML performance report saved to ``report`` if given, and
    the task stream recorded if ``stream`` (yielded: its ``data``, else None)."""
    with contextlib.ExitStack() as stack:
        if report:
            stack.enter_context(performance_report(filename=report))
        yield stack.enter_context(get_task_stream(client)) if stream else None
