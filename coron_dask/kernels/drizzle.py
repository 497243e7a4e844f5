"""resample's per-block kernel: integrations drizzled onto the output grid with drizzle
(jwst's resampling library), numpy in, numpy out."""

import numpy as np
from drizzle.resample import Drizzle


def drizzle_block(
    sci: np.ndarray,
    err: np.ndarray,
    variance: np.ndarray,
    dq: np.ndarray,
    pixmap: np.ndarray,
    out_shape: tuple[int, int],
    bad_bits: int,
) -> np.ndarray:
    """Drizzle integrations (c, m, y, x) (c images of each: a KL-mode cube's planes) onto
    the output grid through ``pixmap`` (y, x, 2), weighted by inverse ``variance``, bad
    pixels (DQ & bad_bits, NaN, no variance) left out.

    Returns (1, c + 2, Y, X): the c weighted sums, the sum of weight² · err² (the output's
    variance times the total weight squared) and the total weight, so that blocks add up.
    """
    out = np.empty((1, len(sci) + 2, *out_shape))
    weights, errors = [], []
    for sigma, var, flags, frame in zip(err, variance, dq, sci[0], strict=True):
        good = np.isfinite(frame) & np.isfinite(var) & (var > 0) & ((flags & bad_bits) == 0)
        weight = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0).astype(np.float32)
        weights.append(weight)
        errors.append(np.where(good & np.isfinite(sigma), weight * sigma**2, 0.0))
    for c, images in enumerate([*sci, errors]):
        driz = Drizzle(kernel="square", out_shape=out_shape, fillval="0", disable_ctx=True)
        for frame, weight in zip(images, weights, strict=True):
            data = np.where(weight > 0, frame, 0.0).astype(np.float32)
            driz.add_image(data, exptime=1.0, pixmap=pixmap, weight_map=weight, pixfrac=1.0)
        out[0, c] = driz.out_img * driz.out_wht
    out[0, -1] = driz.out_wht
    return out
