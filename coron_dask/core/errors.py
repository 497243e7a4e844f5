"""The errors a run can end with, each one line for the user: bad input names the file (or
parameter) and the problem; the cluster says what it could not do; a signal says which."""

import os
import signal
import threading


class CoronInputError(ValueError):
    """Bad input: a file that cannot be used, or a parameter out of range."""

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class ClusterError(RuntimeError):
    """The cluster could not finish the run (scheduler lost, workers killed repeatedly)."""


class Interrupted(BaseException):
    """A signal stopped the run (SIGTERM from scancel or a walltime limit, SIGINT from
    Ctrl-C). A BaseException, as KeyboardInterrupt: nothing on the way catches it by
    accident, and everything on the way cleans up."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


#: The signals this run received. Each is raised as Interrupted where the run is, and
#: recorded: Python only prints an exception raised inside a garbage-collection callback or
#: a ``__del__`` and goes on, so the run also asks ``raise_if_stopped`` before it places
#: its products.
_received: list[int] = []
#: Signals whose Interrupted was lost, delivered again (``redeliver``) after this many
#: seconds, unless the run has ended.
_lost: list[int] = []
REDELIVERY_DELAY = 0.01
_lock = threading.RLock()  # reentrant: a signal handler may run while this thread holds it


def stop(signum: int) -> None:
    """Record ``signum`` and raise Interrupted."""
    with _lock:
        _received.append(signum)
        _lost.clear()  # this one stops the run: a signal sent again would interrupt its cleanup
    raise Interrupted(signum)


def stopping() -> bool:
    """Whether a signal already asked this run to stop."""
    return bool(_received)


def raise_if_stopped() -> None:
    """Raise Interrupted if a signal asked the run to stop and the run went on (the
    exception was lost where it was raised)."""
    with _lock:
        if not _received:
            return
        _lost.clear()  # as ``stop``
    raise Interrupted(_received[0])


def redeliver(signum: int) -> None:
    """An Interrupted was lost where Python ignores exceptions (a garbage-collection
    callback, a ``__del__``): send its signal again, so that the run stops where it is, as
    soon as it is back in its own code, rather than at the end of its computation. Sent a
    moment later from another thread: sent at once, its handler would run where this is
    called, and be lost again."""
    with _lock:
        _lost.append(signum)
    timer = threading.Timer(REDELIVERY_DELAY, _send_again, (signum,))
    timer.daemon = True
    timer.start()


def _send_again(signum: int) -> None:
    with _lock:
        if _lost:  # the run has not ended meanwhile (``forget_stops``)
            os.kill(os.getpid(), signum)


def was_lost() -> bool:
    """Whether a signal's Interrupted was lost and not raised again since (once each)."""
    with _lock:
        if _lost:
            _lost.pop()
            return True
    return False


def forget_stops() -> None:
    """The run is over: signals it received concern it no more, and none is sent again."""
    with _lock:
        _received.clear()
        _lost.clear()
