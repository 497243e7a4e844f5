"""Per-block kernels of outlier_detection and the bad-pixel fill: numpy in, numpy out,
one call per task, temporaries kept to a frame or a batch of frames (``coron_dask.planning.
memory`` predicts a task's peak). The steps map them over dask arrays."""

import numpy as np

from coron_dask.kernels.median_fill import median_fill


def nanmedian_frames(cube: np.ndarray) -> np.ndarray:
    """Median over the first axis ignoring NaN (NaN where a pixel has no value), equal to
    ``np.nanmedian(cube, axis=0)`` bit for bit, with one sorted copy of the cube as its
    only large temporary."""
    ordered = np.sort(cube, axis=0)  # NaN sort last
    count = np.zeros(cube.shape[1:], dtype=np.intp)
    for frame in cube:
        count += ~np.isnan(frame)
    low = np.take_along_axis(ordered, ((np.maximum(count, 1) - 1) // 2)[None], axis=0)[0]
    high = np.take_along_axis(ordered, (count // 2)[None], axis=0)[0]
    median = (low + high) / ordered.dtype.type(2)
    median[count == 0] = np.nan
    return median


def median_block(sci: np.ndarray, dq: np.ndarray, bad_bits: int, maskpt: float) -> np.ndarray:
    """outlier_detection's median image over integrations (rows, nx) of a slab of rows of
    every integration: pixels whose weight (0 where DQ has ``bad_bits``, else 1) is below
    ``maskpt`` are left out."""
    masked = np.empty_like(sci)
    for i, (frame, flags) in enumerate(zip(sci, dq, strict=True)):
        weight = np.where((flags & bad_bits) == 0, np.float32(1), np.float32(0))
        masked[i] = np.where(weight < maskpt, np.float32(np.nan), frame)
    return nanmedian_frames(masked).astype(np.float32)


def flag_block(
    which: str,
    sci: np.ndarray,
    err: np.ndarray,
    dq: np.ndarray,
    median: np.ndarray,
    snr: float,
    outlier_bits: int,
    do_not_use: int,
) -> np.ndarray:
    """One of ``sci``, ``err``, ``dq`` of integrations (m, y, x) after outlier flagging:
    pixels further than ``snr``·ERR from the ``median`` image get ``outlier_bits`` in DQ,
    then every pixel NaN in SCI or ERR or flagged ``do_not_use`` is NaN in both and
    ``do_not_use`` in DQ."""
    out = np.empty_like({"sci": sci, "err": err, "dq": dq}[which])
    for i in range(len(sci)):
        outlier = np.abs(sci[i] - median) > snr * np.nan_to_num(err[i])
        flags = dq[i] | np.where(outlier, np.uint32(outlier_bits), np.uint32(0))
        invalid = np.isnan(sci[i]) | np.isnan(err[i]) | ((flags & do_not_use) > 0)
        if which == "dq":
            out[i] = np.where(invalid, flags | np.uint32(do_not_use), flags)
        else:
            out[i] = np.where(invalid, np.float32(np.nan), sci[i] if which == "sci" else err[i])
    return out


def fill_block(
    image: np.ndarray,
    sci: np.ndarray,
    dq: np.ndarray,
    box: int,
    bad_bitvalue: int,
    non_science_bit: int | None,
) -> np.ndarray:
    """``image`` (m, y, x) with the bad pixels of the exposure (DQ & bad bits, or NaN in SCI)
    filled, frame by frame. With ``non_science_bit`` (jwst does this for MIRI) bad pixels
    flagged with it become 0 and are not filled."""
    out = np.empty_like(image)
    for i in range(len(image)):
        bad = ((dq[i] & bad_bitvalue) > 0) | np.isnan(sci[i]) | np.isnan(image[i])
        frame, non_science = image[i], None
        if non_science_bit is not None:  # 0, and never a neighbour in the medians (jwst)
            non_science = bad & ((dq[i] & non_science_bit) > 0)
            frame = np.where(non_science, 0, frame)
            bad &= ~non_science
        out[i] = median_fill(frame, bad, box, non_science)
    return out
