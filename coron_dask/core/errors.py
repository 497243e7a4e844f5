"""The errors a run can end with, each one line for the user: bad input names the file (or
parameter) and the problem; the cluster says what it could not do; a signal says which."""

import signal


class CoronInputError(ValueError):
    """Bad input: a file that cannot be used, or a parameter out of range."""

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    def __reduce__(self) -> tuple:
        """Pickled as made (a task's error crosses to the client from a worker)."""
        return type(self), (self.source, self.problem)


class ClusterError(RuntimeError):
    """The cluster could not finish the run (scheduler lost, workers killed repeatedly).
    ``resumable``: whether what the run wrote may be taken up by the same run again (not
    when workers wrote where the others do not read)."""

    def __init__(self, message: str, *, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable

    def __reduce__(self) -> tuple:
        return _cluster_error, (str(self), self.resumable)


def _cluster_error(message: str, resumable: bool) -> "ClusterError":
    return ClusterError(message, resumable=resumable)


class Interrupted(BaseException):
    """A signal stopped the run (SIGTERM from scancel or a walltime limit, SIGINT from
    Ctrl-C). A BaseException, as KeyboardInterrupt: nothing on the way catches it by
    accident, and everything on the way cleans up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        #: what the run kept for the same run again to take up, and how (None: nothing)
        self.kept: str | None = None
        super().__init__(f"stopped by {signal.Signals(signum).name}")


#: The signals that asked this run to stop, as their handler records them: nothing is
#: raised from a handler (it may run anywhere, even where Python ignores exceptions); the
#: run's waiting loops and the check before its products are placed act on the record.
_received: list[int] = []


def record_stop(signum: int) -> None:
    """Record that ``signum`` asked the run to stop (a signal handler's whole work)."""
    _received.append(signum)


def stopping() -> bool:
    """Whether a signal asked this run to stop."""
    return bool(_received)


def raise_if_stopped() -> None:
    """Raise Interrupted if a signal asked the run to stop: its waiting loops ask between
    tasks, and the products ask before they are placed."""
    if _received:
        raise Interrupted(_received[0])


def forget_stops() -> None:
    """The run is over: the signals it received concern it no more."""
    _received.clear()


def record_on_disk(error: BaseException, paths: list) -> None:
    """Record on ``error`` that the products ``paths`` are on disk as it ends the run
    (placed before it, or left by a failure to remove them): its one line says so."""
    error.products_on_disk = [*on_disk(error), *(p for p in paths if p not in on_disk(error))]


def on_disk(error: BaseException) -> list:
    """The products on disk as ``error`` ended the run (``record_on_disk``), in order."""
    return list(getattr(error, "products_on_disk", ()))
