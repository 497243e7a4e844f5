"""The functions dask runs on each block of align_refs (klip's: ``steps.klip_blocks``):
they unpack what dask hands a task (blocks in nested lists along contracted axes, tree
sums' arguments) and, for references kept on disk, read the task's own block from its file
(``source``, once the tasks ``after`` stands for wrote it), then call the numpy kernels
(``kernels.registration``, ``kernels.fourier_shift``).

A worker unpickling a task imports numpy, this module and the kernels only: not
dask.array, xarray or astropy (``coron_dask.steps`` imports its steps on first use). Each
keeps its temporaries to a frame, a batch of frames or a tile of rows, so that a task's
peak memory is its inputs and output plus a bounded working set
(``coron_dask.planning.memory`` predicts it).
"""

import numpy as np

from coron_dask.kernels.fourier_shift import shift_spectra
from coron_dask.kernels.registration import fit_shifts, shift_batch


def _references(psfs: np.ndarray, source: object | None) -> np.ndarray:
    """The references of a task: ``psfs`` itself or, with a ``source`` (references kept on
    disk), those ``psfs`` indexes read from it."""
    return psfs if source is None else source[int(psfs[0]) : int(psfs[-1]) + 1]


def fit_block(
    science: np.ndarray,
    psfs: np.ndarray,
    mask: np.ndarray,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """Fits (m, p, 4) of references ``psfs`` (p, y, x) to each science frame (m, y, x):
    (dx, dy, β) and 1 where the fit converged, 0 where not (``fit_shifts``); with
    ``source``, ``psfs`` are indices of references read from it, once the task ``after``
    stands for wrote them."""
    psfs = _references(psfs, source)
    fitted, converged = fit_shifts(science, psfs, mask)
    return np.concatenate([fitted, converged[..., None]], axis=-1)


def shift_block(
    frames: np.ndarray,
    shifts: np.ndarray,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """References (p, y, x) moved by −(dx, dy) of ``shifts`` ([m,] p, 4: ``fit_block``'s):
    ([m,] p, y, x) float32, NaN where the fit did not converge (flagged: klip leaves the
    reference out for that target); with ``source``, ``frames`` are indices of references
    read from it, as in ``fit_block``. Each frame is transformed once per block, whatever
    the number of science integrations it is aligned to; frames go through the FFTs a
    batch at a time."""
    frames = _references(frames, source)
    shape = frames.shape[-2:]
    out = np.empty((*shifts.shape[:-1], *shape), dtype=np.float32)
    batch = min(len(frames), shift_batch(shape[0] * shape[1]))
    # one set of batch buffers for the block: float64 frames (then the shifted images),
    # their spectra and the shifted spectra
    real = np.empty((batch, *shape))
    spectra = np.empty((batch, shape[0], shape[1] // 2 + 1), dtype=np.complex128)
    work = np.empty_like(spectra)
    for start in range(0, len(frames), batch):
        n = min(batch, len(frames) - start)
        part = slice(start, start + n)
        real[:n] = frames[part]
        np.fft.rfft2(real[:n], out=spectra[:n])
        for m, per_frame in enumerate(shifts if shifts.ndim == 3 else [shifts]):
            moves = -np.nan_to_num(per_frame[part, :2])  # a pair not fitted: NaN below
            images = shift_spectra(spectra[:n], shape, moves, work=work[:n], out=real[:n])
            out[(m, part) if shifts.ndim == 3 else part] = images
    out[shifts[..., 3] == 0] = np.nan  # the pairs whose fit did not converge
    return out


def keep_block(block: np.ndarray, axis: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """The first step of a tree sum whose terms are already blocks of one: nothing to do."""
    return block


def add_blocks(blocks: list, axis: tuple[int, ...], keepdims: bool) -> np.ndarray:
    """Sum of blocks (each of length 1 along ``axis``), in their order, into one new array:
    no concatenated copy of the terms."""
    total = np.array(blocks[0], copy=True)
    for block in blocks[1:]:
        total += block
    return total if keepdims else total.squeeze(axis)
