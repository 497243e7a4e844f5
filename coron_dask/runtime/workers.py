"""What coron-dask sets up on the dask workers it runs on, however they were started
(LocalCluster, ``dask worker`` in a batch script, jobqueue jobs): glibc malloc as the
memory model counts on, no transparent huge pages, and freed memory given back after each
task; and a check that the worker sees the run's output folder and input files where the
client does (``shared_view``)."""

import ctypes
import os
import signal
import socket

from distributed.diagnostics.plugin import WorkerPlugin

from coron_dask.planning.memory import MALLOC

#: mallopt(3) parameters of glibc for ``memory.MALLOC``'s settings.
MALLOPT = {"TRIM_THRESHOLD": -1, "MMAP_THRESHOLD": -3, "ARENA_MAX": -8}
#: prctl(2) option that turns transparent huge pages off for the whole process.
PR_SET_THP_DISABLE = 41


def dask_setup(worker: object) -> None:
    """Preload of the LocalCluster's worker processes (dask runs it as each starts): they
    ignore SIGINT. Ctrl-C reaches every process of the terminal's group; the run that
    started them catches it, and closes them as it ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def configure_memory() -> bool:
    """Make this worker process allocate as the memory model counts: ``memory.MALLOC``'s
    glibc malloc settings (workers started by other means than our LocalCluster: ``dask
    worker`` in a batch script or a jobqueue job), and no transparent huge pages (numpy
    asks for them on large arrays; each then rounds up to 2 MiB, and how much depends on
    the kernel's THP setting, not on the task: measured on 320² FFT kernels, no slower).
    False where the C library is not glibc or the kernel refused."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt, prctl = libc.mallopt, libc.prctl
    except (OSError, AttributeError):
        return False
    malloc = all(mallopt(MALLOPT[name], value) == 1 for name, value in MALLOC.items())
    return malloc and prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) == 0


class TrimAfterTasks(WorkerPlugin):
    """A dask worker plugin: after each task, glibc gives the heap memory it freed back to
    the system (malloc_trim). Without it a worker's resident memory creeps up over a long
    run (320², 220 references, 1 GiB workers: 515 MB to 714 MB) while what it holds does
    not, and the memory model bounds what is held, plus what a heap keeps within a task."""

    name = "coron-dask-trim"

    def setup(self, worker: object) -> None:
        try:
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self.trim = None

    def transition(self, key: object, start: str, finish: str, **kwargs: object) -> None:
        if start == "executing" and self.trim is not None:
            self.trim(0)


#: The topic of the events a worker that joined during a run logs when it does not see the
#: run's output folder where the client does (``SharedFolderCheck``).
SHARED_TOPIC = "coron-dask-shared-folder"


def shared_view(
    folder: str, given: str, token: str, content: str, members: tuple[str, ...]
) -> tuple[str, str | None]:
    """This worker's host, and what it does not see as the client does (None: all of it):
    the output ``folder`` (absolute; ``given`` as the run names it, relative to the worker's
    working folder if relative) holding the client's ``token`` file of ``content``, writable;
    and every input file of ``members``, readable. Workers write blocks into partial and
    scratch files in that folder and read the aligned references back from them."""
    host = socket.gethostname()
    if os.path.abspath(given) != folder:
        return host, f"{given} is {os.path.abspath(given)} from its working folder {os.getcwd()}"
    path = os.path.join(folder, token)
    try:
        with open(path) as handle:
            seen = handle.read()
    except FileNotFoundError:
        what = "another folder of that name" if os.path.isdir(folder) else "no such folder"
        return host, f"{what} (the client's token file is not there)"
    except OSError as error:
        return host, f"cannot read the client's token file ({error.strerror or error})"
    if seen != content:
        return host, "another folder of that name (the client's token file differs)"
    probe = f"{path}.{host}.{os.getpid()}"
    try:
        with open(probe, "w") as handle:
            handle.write(content)
        os.unlink(probe)
    except OSError as error:
        return host, f"cannot write there ({error.strerror or error})"
    for member in members:
        try:
            with open(member, "rb"):
                pass
        except OSError as error:
            return host, f"cannot read the input file {member} ({error.strerror or error})"
    return host, None


def not_seen(seen: dict) -> list[str]:
    """``address on host: problem`` of each worker whose answer in ``seen`` (``shared_view``'s,
    by address, as ``client.run`` returns them) says it does not see as the client does."""
    return [
        f"{address}: the check failed ({answer!r})"
        if isinstance(answer, BaseException)
        else f"{address} on {answer[0]}: {answer[1]}"
        for address, answer in sorted(seen.items())
        if isinstance(answer, BaseException) or answer[1] is not None
    ]


class SharedFolderCheck(WorkerPlugin):
    """A dask worker plugin, registered for the duration of a run: a worker that joins
    during it (an adaptive jobqueue cluster's) checks ``shared_view`` as it starts and, if
    it does not see the output folder as the client does, logs an event of
    ``SHARED_TOPIC`` (its address, host and what it does not see: ``seen``) that fails the
    run."""

    name = SHARED_TOPIC

    def __init__(self, *view: object) -> None:
        self.view = view

    def setup(self, worker: object) -> None:
        host, problem = shared_view(*self.view)
        if problem is not None:
            seen = f"{worker.address} on {host}: {problem}"
            worker.log_event(SHARED_TOPIC, {"token": self.view[2], "seen": seen})
