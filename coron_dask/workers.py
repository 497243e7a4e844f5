"""What coron-dask sets up on the dask workers it runs on, however they were started
(LocalCluster, ``dask worker`` in a batch script, jobqueue jobs): glibc malloc as the
memory model counts on, and freed memory given back after each task; and how a worker's
baseline memory is measured."""

from distributed.diagnostics.plugin import WorkerPlugin

from coron_dask.memory import MALLOC

#: mallopt(3) parameters of glibc for ``memory.MALLOC``'s settings.
MALLOPT = {"TRIM_THRESHOLD": -1, "MMAP_THRESHOLD": -3, "ARENA_MAX": -8}


def configure_malloc() -> bool:
    """Apply ``memory.MALLOC`` to this process's glibc malloc (workers started by other
    means than our LocalCluster: ``dask worker`` in a batch script or a jobqueue job).
    False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(MALLOPT[name], value) == 1 for name, value in MALLOC.items())


class TrimAfterTasks(WorkerPlugin):
    """A dask worker plugin: after each task, glibc gives the heap memory it freed back to
    the system (malloc_trim). Without it a worker's resident memory creeps up over a long
    run (320², 220 references, 1 GiB workers: 515 MB to 714 MB) while what it holds does
    not, and the memory model bounds what is held, plus what a heap keeps within a task."""

    name = "coron-dask-trim"

    def setup(self, worker: object) -> None:
        import ctypes

        try:
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self.trim = None

    def transition(self, key: object, start: str, finish: str, **kwargs: object) -> None:
        if start == "executing" and self.trim is not None:
            self.trim(0)


def process_memory() -> int:
    """Resident memory of this process (bytes), once the modules tasks import are loaded:
    a worker's baseline."""
    import psutil

    import coron_dask.io.fitsfile
    import coron_dask.kernels.blocks  # noqa: F401

    return psutil.Process().memory_info().rss
