"""The KL images of a science exposure's KLIP on windows around companions, lazily: what the
exact RDI forward model (``kernels.forward_model``) needs, and all it needs, of a basis.

KLIP's tasks never make the KL images whole (``steps.klip``): a basis is its KL weights W
(m, Z, 2, p, K) over the references aligned to each integration. A companion's forward
model needs the images only on a window of a few hundred pixels, Z_ik = Σ_p W[p, k]
(R_p − μ_p) there, zone by zone: one task per block of science integrations reads the
window's rows of the aligned references (from psfalign on disk, as the KLIP tasks read
them, or the blocks handed over) and gives (n, m, K, wy, wx), n windows at once. The
tasks are named ``companion-windows``; ``planning.memory.companion_windows`` counts them.
"""

import dask.array as da
import numpy as np
from dask.base import tokenize

from coron_dask.kernels.zones import Zones
from coron_dask.steps.klip import KLBasis
from coron_dask.steps.klip_blocks import joined


def window_labels(
    zones: Zones | None, frame: tuple[int, int], corners: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """The zone of every pixel of each window (n, wy, wx): windows of ``shape`` whose first
    pixel is at ``corners`` (n, 2) = (y0, x0) of a ``frame`` (ny, nx); −1 in no zone and
    beyond the frame. Without zones, one zone (0) over the frame."""
    labels = np.zeros(frame, np.int32) if zones is None else zones.labels.astype(np.int32)
    padded = np.full((len(corners), *shape), -1, np.int32)
    for j, (ys, xs, inner) in enumerate(_cuts(corners, shape, frame)):
        padded[j][inner] = labels[ys, xs]
    return padded


def zone_sizes(zones: Zones | None, frame: tuple[int, int]) -> np.ndarray:
    """The pixels of each zone of the whole frame (KLIP's mean divides by them)."""
    return np.array([frame[0] * frame[1]]) if zones is None else zones.pixels


def _cuts(corners: np.ndarray, shape: tuple[int, int], frame: tuple[int, int]):
    """For each window: the frame's rows and columns it covers, and where in the window."""
    for y0, x0 in np.asarray(corners, dtype=int).reshape(-1, 2):
        ys = slice(max(y0, 0), min(y0 + shape[0], frame[0]))
        xs = slice(max(x0, 0), min(x0 + shape[1], frame[1]))
        inner = (
            slice(ys.start - y0, max(ys.stop - y0, ys.start - y0)),
            slice(xs.start - x0, max(xs.stop - x0, xs.start - x0)),
        )
        yield ys, xs, inner


def windows_block(
    aligned: list | np.ndarray,
    means: list | np.ndarray,
    weights: list | np.ndarray,
    corners: np.ndarray,
    shape: tuple[int, int],
    frame: tuple[int, int],
    zones: Zones | None,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """The KL images (n, m, K, wy, wx) float64 of m targets on n windows (``corners``,
    ``shape``): the references aligned to each (the block (m, p, y, x), or with ``source``
    the targets' indices into psfalign on disk, a target's window rows read at a time),
    minus
    their means over each zone (m, p, Z), weighted by the zone's W (m, Z, 2, p, K). A
    reference flagged for a target (non-finite mean) counts as 0, as in KLIP's tasks;
    NaN in no zone and beyond the frame."""
    weights, means = joined(weights), joined(means)
    m, count = weights.shape[0], weights.shape[-1]
    labels = window_labels(zones, frame, corners, shape)
    out = np.full((len(labels), m, count, *shape), np.nan)
    block = None if source is not None else joined(aligned)
    targets = joined(aligned) if source is not None else None
    for j, (ys, xs, inner) in enumerate(_cuts(corners, shape, frame)):
        if ys.start >= ys.stop or xs.start >= xs.stop:
            continue
        window, shared = labels[j][inner], None
        for i in range(m):
            if source is None:
                refs = block[i, :, ys, xs]
            elif len(source.shape) == 3:  # one set of references for every target
                shared = source[:, ys][..., xs] if shared is None else shared
                refs = shared
            else:  # the target's references on the window's rows, read alone
                target = int(targets[i])
                refs = source[target : target + 1, :, ys][0][..., xs]
            for z in np.unique(window[window >= 0]):
                inside = window == z
                centred = refs[:, inside].astype(np.float64) - means[i, :, z, None]
                centred[~np.isfinite(means[i, :, z])] = 0.0
                images = weights[i, z, 0].T @ centred
                out[j, i][(slice(None), *inner)][:, inside] = images
            refs = centred = images = None  # let go of before the next is read
    return out


def kl_windows(
    basis: KLBasis, corners: np.ndarray, shape: tuple[int, int], group: int = 0
) -> da.Array:
    """The KL images of ``basis`` (one science exposure's, ``steps.klip.kl_basis``) on the
    windows of ``shape`` (wy, wx) at ``corners`` (n, 2) = (y0, x0): (n, m, K, wy, wx)
    float64, lazy, chunked as the integrations and in ``group``s of windows, a task each
    (the block plan's; 0: all in one); NaN in no zone and beyond the frame."""
    corners = np.asarray(corners, dtype=int).reshape(-1, 2)
    if 0 < group < len(corners):
        starts = range(0, len(corners), group)
        return da.concatenate([kl_windows(basis, corners[j : j + group], shape) for j in starts])
    target = basis.science
    frame = tuple(target.shape[1:])
    references = basis.references[0]
    if basis.reading:  # psfalign on disk: targets' indices, and the writes to wait for
        source, _, written, letters = basis.reading
        reading = (source, None, written, ("m" if letters[0] == "m" else "t") + "uv")
        references = (references, "m")
    else:  # the blocks themselves, joined whole along the references
        reading = ()
        references = (references, "mpqr")  # p first: its pieces are joined along it
    name = tokenize(basis.weights, basis.means, references, reading, corners, shape)
    return da.blockwise(
        windows_block,
        "nmkYX",
        *references,
        basis.means,
        "mpz",
        basis.weights,
        "mzwak",  # its own letter for the references: one block along them
        corners,
        None,
        tuple(shape),
        None,
        frame,
        None,
        basis.zones,
        None,
        *reading,
        new_axes={"n": len(corners), "Y": shape[0], "X": shape[1]},
        concatenate=False,
        dtype=np.float64,
        name=f"companion-windows-{name}",
        meta=np.empty((0,) * 5),
    )
