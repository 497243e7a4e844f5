"""How a signal ends a run: SIGTERM (scancel, a walltime limit) and SIGINT (Ctrl-C) are
recorded by their handler, which does nothing else; the run's waiting loops see the record
(``errors.raise_if_stopped``) and end the run as an error does: tasks cancelled and
awaited, partial products removed, the cluster closed."""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from dask.callbacks import Callback

from coron_dask.core import errors

#: The signals that end a run.
STOPPING = (signal.SIGTERM, signal.SIGINT)


def record_signal(signum: int, _frame: object) -> None:
    """The handler: record the first signal; a later one says that the run is ending (the
    cleaning up is what makes the end clean)."""
    if errors.stopping():
        os.write(2, f"coron-dask: {signal.Signals(signum).name}: still cleaning up\n".encode())
    else:
        errors.record_stop(signum)


@contextlib.contextmanager
def signals_end_the_run() -> Iterator[None]:
    """SIGTERM and SIGINT, while this lasts, are recorded for the run to act on; the
    previous handlers are restored, and the record forgotten, when it ends. Signal handlers
    belong to the main thread: in another, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, record_signal) for number in STOPPING}
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)
        errors.forget_stops()


def _check(*_args: object) -> None:
    errors.raise_if_stopped()


def stop_between_tasks() -> Callback:
    """A dask callback for the local schedulers (synchronous, threads): their loop, in the
    main thread, raises Interrupted before and after each task once a signal asked the run
    to stop."""
    return Callback(pretask=_check, posttask=_check)
