"""Where the graph runs: a LocalCluster started for the run, an existing distributed
scheduler (address or scheduler file), or one of dask's local schedulers."""

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import dask
from dask.delayed import Delayed

LOCAL_SCHEDULERS = ("synchronous", "sync", "single-threaded", "threads", "threading")
#: Environment of LocalCluster workers. One BLAS thread per worker thread (dask runs one
#: task per thread). glibc malloc: distributed's default MALLOC_TRIM_THRESHOLD_=65536 also
#: pins the mmap threshold at 128 KiB, so every FFT temporary is mapped and faulted in
#: afresh, which halves the speed of the shift fit; arrays under 32 MiB reuse the heap here,
#: and free memory over 64 MiB still goes back to the system.
WORKER_ENVIRON = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": str(2**25),
    "MALLOC_TRIM_THRESHOLD_": str(2**26),
}


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int = 1,
    memory_limit: str | float | None = "auto",
    dashboard_address: str = "127.0.0.1:8787",
    quiet: bool = False,
) -> Iterator[object | None]:
    """Yield a distributed Client for the run (None for dask's local schedulers).

    ``scheduler`` is an address (``tcp://host:port``) or a local scheduler name
    (``synchronous``, ``threads``); with neither it nor ``scheduler_file`` a LocalCluster of
    ``n_workers`` processes is started, its dashboard bound to ``dashboard_address``.
    """
    if scheduler in LOCAL_SCHEDULERS:
        with dask.config.set(scheduler=scheduler):
            yield None
        return
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if scheduler or scheduler_file:
            client = stack.enter_context(
                Client(scheduler, scheduler_file=scheduler_file, set_as_default=True)
            )
        else:
            workers = n_workers or max(1, (os.cpu_count() or 1) // threads_per_worker)
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"), **WORKER_ENVIRON}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
                cluster = stack.enter_context(
                    LocalCluster(
                        n_workers=workers,
                        threads_per_worker=threads_per_worker,
                        processes=True,
                        memory_limit=memory_limit,
                        dashboard_address=dashboard_address,
                        host="127.0.0.1",
                    )
                )
            client = stack.enter_context(Client(cluster, set_as_default=True))
        if not quiet:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr, flush=True)
        yield client


def task_memory(client: object | None) -> tuple[int, int]:
    """Memory per worker thread (bytes) and the number of worker threads, of the cluster
    ``client`` is connected to, or of this machine for dask's local schedulers."""
    if client is None:
        from distributed.system import MEMORY_LIMIT

        threads = os.cpu_count() or 1
        return MEMORY_LIMIT // threads, threads
    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    threads = sum(w["nthreads"] for w in workers)
    per_thread = [w["memory_limit"] // w["nthreads"] for w in workers if w["memory_limit"]]
    if not per_thread:
        from distributed.system import MEMORY_LIMIT

        per_thread = [MEMORY_LIMIT // max(threads, 1)]
    return min(per_thread), max(threads, 1)


def execute(writes: Sequence[Delayed], client: object | None, *, progress: bool = True) -> None:
    """Compute ``writes`` together (shared inputs load once), with a progress bar if asked
    and the output is a terminal (a bar redrawn in a batch log is only noise)."""
    progress = progress and sys.stderr.isatty()
    if client is None:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):
                dask.compute(*writes)
        else:
            dask.compute(*writes)
        return
    from distributed import progress as show_progress

    futures = client.compute(list(writes))
    if progress:
        show_progress(futures)
        print(file=sys.stderr)
    client.gather(futures)
