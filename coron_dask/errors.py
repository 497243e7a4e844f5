"""The one error users see for bad input: it names the file (or parameter) and the problem."""


class CoronInputError(ValueError):
    """Bad input: a file that cannot be used, or a parameter out of range."""

    def __init__(self, source: object, problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class ClusterError(RuntimeError):
    """The cluster could not finish the run (scheduler lost, workers killed repeatedly)."""
