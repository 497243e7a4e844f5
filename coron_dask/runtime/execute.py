"""Computing a run's writes: all together (shared inputs loaded once), with progress per
step, a signal seen between tasks ending the run, dask's performance report, and a summary
of where the time went (``--stats``)."""

import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence

import dask
import dask.local
import dask.threaded
from dask.callbacks import Callback
from dask.core import get_deps
from threadpoolctl import threadpool_limits

from coron_dask.runtime import progress
from coron_dask.runtime.deploy import THREADED, measure_workers, on_cluster
from coron_dask.runtime.progress import Lines, blocks_written
from coron_dask.runtime.settings import seconds
from coron_dask.runtime.signals import stop_between_tasks

#: The steps (``progress.labels``) and the stage of ``--stats`` their time counts
#: towards, first match wins.
STAGES = (
    ("align_refs-fit", "align_refs: shift fit"),
    ("align_refs-shift", "align_refs: shift"),
    ("align_refs-fill", "align_refs: bad-pixel fill"),
    ("klip", "klip"),
    ("outlier_detection", "outlier_detection"),
    ("resample", "resample"),
    ("detection", "detection"),
    ("read-", "read calints"),
    ("write_", "write products"),
)


def stage_of(label: str) -> str:
    """The pipeline stage of a task of step ``label``."""
    return next((stage for part, stage in STAGES if label.startswith(part)), "other")


def summarize_task_stream(records: list[dict], steps: Mapping | None = None) -> dict:
    """Per pipeline stage, from a task stream: the seconds of its tasks and of dask's
    operations feeding them, the number of its own tasks (those whose name names a step:
    one fit per alignment block) and of those operations. ``steps`` gives a task's step
    (``progress.labels``); a task missing there counts where its own name says."""
    steps = steps or {}
    stages: dict[str, dict[str, float]] = {}
    for record in records:
        key = record["key"]
        own = progress.step_of(progress.name_of(key))
        label = steps.get(key) or own or progress.OTHER
        for period in record["startstops"]:
            if period["action"] != "compute":
                continue
            entry = stages.setdefault(
                stage_of(label), {"seconds": 0.0, "tasks": 0, "dask_tasks": 0}
            )
            entry["seconds"] += period["stop"] - period["start"]
            entry["tasks" if own else "dask_tasks"] += 1
    return stages


class LocalWatch(Callback):
    """A dask callback for the local schedulers: the step of every task of the graph,
    progress lines per step, and each task's compute period in the form of distributed's
    task stream (for ``--stats``)."""

    def __init__(self, lines: Lines | None) -> None:
        super().__init__()
        self.lines, self.records, self.started = lines, [], {}
        self.tally = progress.Tally()

    def _start_state(self, dsk: dict, state: dict) -> None:
        dependencies, _ = get_deps(dsk)
        # data (an array read lazily) is never run as a task
        tasks = {key: deps for key, deps in dependencies.items() if key not in state["cache"]}
        self.tally.add(tasks)

    def _pretask(self, key: object, _dsk: dict, _state: dict) -> None:
        self.started[key] = time.time()

    def _posttask(self, key: object, _result: object, _dsk: dict, _state: dict, _id: int) -> None:
        stop = time.time()
        period = {"action": "compute", "start": self.started.pop(key, stop), "stop": stop}
        self.records.append({"key": key, "startstops": [period]})
        if self.lines is not None:
            self.tally.finished(key)
            finished = self.tally.done == self.tally.totals
            self.lines.show(self.tally.summary(), finished)


def _one_blas_thread_per_task() -> contextlib.AbstractContextManager:
    """Under dask's local schedulers, BLAS (the fit's and KLIP's matrix products) on one
    thread per task, as distributed's worker processes have it: a product's last bits
    can change with the number of BLAS threads (rows split differently), and the products
    are the same wherever they are computed; and BLAS's own threads on top of the
    threaded scheduler's oversubscribe the cores (KLIP took 1.6 times as long)."""
    return threadpool_limits(limits=1, user_api="blas")


def execute(
    writes: Sequence[object],
    client: object | None,
    *,
    progress: bool = True,
    report: str | os.PathLike | None = None,
    stats: str | os.PathLike | None = None,
) -> None:
    """Compute ``writes`` (dask collections) together, shared inputs loaded once, with
    dask's own optimisation, showing progress per step if asked: bars on a terminal, lines
    in a batch log, distributed's widget in Jupyter. A signal the run received ends it
    between tasks (Interrupted).

    ``report`` saves dask's HTML performance report (a distributed cluster only); ``stats``
    a JSON summary: wall time, task seconds per stage, the blocks written of each kind of
    product, the workers (count, threads, memory limit of each; this process on dask's
    local schedulers) and how many were lost during the run.
    """
    lines = Lines(seconds("status-interval")) if progress else None
    start = time.perf_counter()
    summary: dict = {}
    if client is None:
        watch = LocalWatch(lines)
        # the scheduler's function, not its name: for a name dask imports distributed
        # (0.4 s) to look for a client first
        get = dask.threaded.get if dask.config.get("scheduler", None) in THREADED else None
        with watch, stop_between_tasks(), _one_blas_thread_per_task():
            try:
                dask.compute(list(writes), scheduler=get or dask.local.get_sync)
            finally:
                if lines is not None:
                    lines.close()
        if stats:  # this process, as the block plan saw it
            workers = measure_workers(None)
            summary = {
                "workers": workers.count,
                "threads": workers.threads,
                "memory_limit_per_worker": workers.memory_limit,
                "workers_lost": 0,
            }
        summary["stages"] = summarize_task_stream(watch.records, watch.tally.steps)
        summary["blocks_written"] = blocks_written(watch.tally.steps)
    else:
        connection = on_cluster()
        before = client.scheduler_info(n_workers=-1)["workers"]
        # current for this run only: nothing of it stays in dask's global configuration
        with client.as_current(), connection.recorded(client, report, bool(stats)) as stream:
            steps = connection.follow(client, writes, lines, labels=bool(stats))
        after = client.scheduler_info(n_workers=-1)["workers"]
        if stream is not None:
            summary = {
                "workers": len(after),
                "threads": sum(w["nthreads"] for w in after.values()),
                "memory_limit_per_worker": min(w["memory_limit"] for w in after.values()),
                "workers_lost": len(set(before) - set(after)),
                "stages": summarize_task_stream(stream.data, steps),
                "blocks_written": blocks_written(steps or {}),
            }
    if stats:
        summary["wall_seconds"] = time.perf_counter() - start
        with open(stats, "w") as handle:
            json.dump(summary, handle, indent=2)
