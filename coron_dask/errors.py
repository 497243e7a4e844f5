"""The errors a run can end with, each one line for the user: bad input names the file (or
parameter) and the problem; the cluster says what it could not do; a signal says which."""

import signal


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
