"""A sampler's walkers evaluated on the cluster's workers.

An ADI companion's likelihood costs an eigendecomposition of the references' Gram matrix
per zone, roll and walker at every step (``science.companion_adi``): with hundreds of
references, seconds a step on one core. emcee evaluates all walkers of a step at once
(vectorised); ``walker_spreader`` splits them into one part per worker thread, each part a
task, the model sent to every worker once. The chain is the same as on one core: the same
walkers get the same numbers, in the same order.
"""

from collections.abc import Callable

import numpy as np
from distributed import Client


def _log_probability(model: object, theta: np.ndarray) -> np.ndarray:
    """A part of a step's walkers, on a worker."""
    return model.log_probability(theta)


def walker_spreader(
    client: Client, parts: int | None = None
) -> Callable[[object], Callable[[np.ndarray], np.ndarray]]:
    """For a model, the function that evaluates its ``log_probability`` on (n, 3) walkers
    split into ``parts`` tasks (default: the cluster's threads) on ``client``'s workers."""
    count = parts or max(1, sum(client.nthreads().values()))

    def spread(model: object) -> Callable[[np.ndarray], np.ndarray]:
        held = client.scatter(model, broadcast=True, hash=False)

        def log_probability(theta: np.ndarray) -> np.ndarray:
            chunks = [c for c in np.array_split(np.atleast_2d(theta), count) if len(c)]
            futures = client.map(_log_probability, [held] * len(chunks), chunks, pure=False)
            return np.concatenate(client.gather(futures))

        return log_probability

    return spread
