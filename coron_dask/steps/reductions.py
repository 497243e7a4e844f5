"""Reductions the steps share, in a fixed order, so that results do not depend on blocks."""

import dask.array as da
import numpy as np

from coron_dask.planning.memory import SPLIT_EVERY
from coron_dask.steps.blocks import add_blocks, keep_block


def tree_sum(terms: da.Array, axis: int, name: str) -> da.Array:
    """Sum of ``terms`` (blocks of one along ``axis``) in a tree of fixed fan-in, so that
    the order of the additions, and the result, depend on the number of terms only."""
    return da.reduction(
        terms,
        keep_block,
        add_blocks,
        combine=add_blocks,
        axis=axis,
        split_every={axis: SPLIT_EVERY},
        concatenate=False,
        dtype=terms.dtype,
        meta=np.empty((0,) * (terms.ndim - 1), dtype=terms.dtype),
        name=name,
    )
