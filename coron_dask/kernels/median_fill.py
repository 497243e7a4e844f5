"""Replacement of bad pixels by the median of the good pixels around them.

jwst's ``median_replace_img`` fills each bad pixel with the median of the good pixels in a
``box`` × ``box`` window (an even box acts as the next odd one), or 0 where there are none.
Two deliberate differences, both at places where jwst's result is an artefact:

- windows at the image edge are cut at the edge; jwst's negative slice start makes them
  empty, so jwst writes 0 into every bad pixel of the first ``box // 2`` rows and columns;
- every fill uses the good pixels of the input; jwst fills in row order and lets a filled
  NaN that is not flagged in DQ feed the medians of the pixels after it.
Where neither applies, the result is identical.
"""

import numpy as np

#: Bad pixels whose windows are gathered at once: bounds the fill's working memory.
FILL_BATCH = 4096


def median_fill(
    image: np.ndarray, bad: np.ndarray, box: int, unusable: np.ndarray | None = None
) -> np.ndarray:
    """Copy of ``image`` (..., ny, nx) with the pixels where ``bad`` is true filled.

    A pixel counts as good for the medians when it is finite, not ``bad`` and not
    ``unusable`` (pixels left as they are but not to be used, such as MIRI's NON_SCIENCE).
    """
    filled = np.array(image, copy=True)
    bad = np.broadcast_to(bad, filled.shape)
    where = np.nonzero(bad)
    if where[0].size == 0:
        return filled
    half = int(box / 2)
    if half == 0:
        filled[where] = 0.0
        return filled
    pad = [(0, 0)] * (filled.ndim - 2) + [(half, half), (half, half)]
    excluded = bad if unusable is None else bad | unusable
    good = np.pad(
        np.where(excluded, np.nan, filled).astype(np.float64), pad, constant_values=np.nan
    )
    offsets = np.arange(2 * half + 1)
    for start in range(0, where[0].size, FILL_BATCH):
        part = tuple(index[start : start + FILL_BATCH] for index in where)
        rows = part[-2][:, None, None] + offsets[None, :, None]
        cols = part[-1][:, None, None] + offsets[None, None, :]
        lead = tuple(index[:, None, None] for index in part[:-2])
        windows = good[(*lead, rows, cols)].reshape(part[0].size, -1)
        counts = np.isfinite(windows).sum(axis=1)
        values = np.zeros(part[0].size)
        some = counts > 0
        values[some] = np.nanmedian(windows[some], axis=1)
        filled[part] = values
    return filled
