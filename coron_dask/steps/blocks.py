"""The functions dask runs on each block of align_refs and klip: they unpack what dask
hands a task (blocks in nested lists along contracted axes, tree sums' arguments) and, for
references kept on disk, read the task's own block from its file (``source``, once the
tasks ``after`` stands for wrote it), then call the numpy kernels
(``kernels.registration``, ``kernels.fourier_shift``, ``kernels.klip``).

A worker unpickling a task imports numpy, this module and the kernels only: not
dask.array, xarray or astropy (``coron_dask.steps`` imports its steps on first use). Each
keeps its temporaries to a frame, a batch of frames or a tile of rows, so that a task's
peak memory is its inputs and output plus a bounded working set
(``coron_dask.planning.memory`` predicts it).
"""

from collections.abc import Iterator

import numpy as np

from coron_dask.kernels import klip
from coron_dask.kernels.fourier_shift import shift_spectra
from coron_dask.kernels.registration import fit_shifts, shift_batch


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array``, or a copy of it if its data are not aligned for its dtype. distributed
    hands a task the arrays it received as views into the bytes read, at any offset, and
    numpy multiplies a misaligned matrix by a vector without BLAS, adding up in another
    order: KLIP's result would otherwise depend on which worker made its KL weights. One
    target's matrices at a time: a broadcast block (``align_to="first"``) stays a view."""
    return array if array.flags.aligned else array.copy()


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


def means_block(refs: np.ndarray) -> np.ndarray:
    """Spatial means (..., p) float64 of reference frames (..., p, y, x)."""
    return klip.frame_means(refs)


def _centred_tile(pieces: list, means: list, i: int) -> np.ndarray:
    """The references aligned to target ``i`` on a tile, as one float64 (p, rows·nx) array
    minus their means, from the pieces (m, p_j, rows, nx) they are held in along the
    reference axis: the tile itself is never copied in float32. A reference flagged for
    the target (a frame with a non-finite mean: NaN, ``shift_block``) is a row of zeros,
    which ``klip.kl_weights`` leaves out."""
    rows = [piece[i].reshape(piece.shape[1], -1) for piece in _pieces(pieces)]
    centred = np.empty((sum(r.shape[0] for r in rows), rows[0].shape[1]))
    start = 0
    for r in rows:
        centred[start : start + len(r)] = r
        start += len(r)
    means = np.concatenate([m[i] for m in _pieces(means)])
    centred -= means[:, None]
    flagged = ~np.isfinite(means)  # NaN frames: fits that did not converge (shift_block)
    if flagged.any():  # rows of 0: nothing in the Gram matrix, the overlaps, the projection
        centred[flagged] = 0.0
    return centred


def _pieces(blocks: list) -> list:
    """Blocks dask hands over along contracted axes, flattened to one list."""
    return [b for inner in blocks for b in _pieces(inner)] if isinstance(blocks, list) else [blocks]


def _tiles(aligned: list | np.ndarray, rows: int, source: object | None) -> Iterator[list]:
    """The references aligned to a KLIP task's targets, a tile of ``rows`` frame rows at a
    time, as pieces (m, p_j, rows, x) along the reference axis: views of the blocks
    (m, p_j, y, x) ``aligned`` holds, or with ``source`` (m, p, y, x), or (p, y, x) for
    one target, read from it for the targets ``aligned`` gives the indices of."""
    if source is None:
        blocks = _pieces(aligned)
        for start in range(0, blocks[0].shape[2], rows):
            yield [block[:, :, start : start + rows] for block in blocks]
        return
    targets = _pieces(aligned)[0]
    for start in range(0, source.shape[-2], rows):
        part = slice(start, min(start + rows, source.shape[-2]))
        if len(source.shape) == 3:
            yield [source[:, part][None]]
        else:
            yield [source[int(targets[0]) : int(targets[-1]) + 1, :, part]]


def gram_block(
    aligned: list | np.ndarray,
    means: list,
    targets: list | np.ndarray | None,
    rows: int,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """Gram matrices (m, p, p) of the mean-subtracted references aligned to each of m
    targets, summed over tiles of ``rows`` rows in order (``_tiles``: from the blocks, or
    read from ``source`` once the tasks ``after`` stands for wrote them). With ``targets``
    (m, y, x), each Gram matrix is bordered by its target's overlaps with the references,
    (m, p, p + 1), summed as ``overlaps_block`` sums them: the pass over the references that
    makes the Gram matrix makes the overlaps too, rather than a pass of their own."""
    centred_targets = None if targets is None else _centred_targets(_whole(targets))
    out = None
    for tile in _centred_tiles(aligned, means, rows, source):
        if out is None:
            bordered = 0 if centred_targets is None else 1
            out = np.zeros((len(tile.pieces[0]), tile.npsf, tile.npsf + bordered))
        for i in range(len(out)):
            centred = tile(i)
            out[i, :, : tile.npsf] += centred @ centred.T
            if centred_targets is not None:
                out[i, :, tile.npsf] += centred @ centred_targets[i, tile.pixels]
            del centred  # before the next target's is made
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


def weights_block(grams: np.ndarray, npix: int, truncate: int) -> np.ndarray:
    """KL weights W and C (m, 2, p, K) of each of m targets from its Gram matrix (m, p, p),
    or (m, p, p + 1) bordered by the overlaps (``gram_block``): the matrix is taken out
    whole (contiguous, aligned), so that the weights are those of an unbordered one."""
    gram = [_aligned(np.ascontiguousarray(g[:, : len(g)])) for g in grams]
    return np.stack([klip.kl_weights(g, npix, truncate) for g in gram])


def _whole(blocks: list | np.ndarray) -> np.ndarray:
    """A block dask hands over in pieces along contracted axes (nested lists), joined (no
    copy when it is one piece)."""
    pieces = _pieces(blocks)
    return pieces[0] if len(pieces) == 1 else np.block(blocks)


class _CentredTiles:
    """The references on one tile (pieces as ``_tiles`` yields them) minus their means, for
    target after target: made once when every target has the same references (a leading
    axis of one, or broadcast: ``align_to="first"``), else one target's at a time."""

    def __init__(self, pieces: list, means: list, rows: slice) -> None:
        self.pieces, self.means, self.rows = pieces, means, rows
        first = pieces[0]
        self.npsf = sum(piece.shape[1] for piece in pieces)
        self.height, self.nx = first.shape[2:]
        self.pixels = slice(rows.start * self.nx, rows.stop * self.nx)  # in a flat frame
        self.shared = first.shape[0] == 1 or first.strides[0] == 0
        self.made = None

    def __call__(self, i: int) -> np.ndarray:
        if not self.shared:
            return _centred_tile(self.pieces, self.means, i)
        if self.made is None:
            self.made = _centred_tile(self.pieces, self.means, 0)
        return self.made


def _centred_tiles(
    aligned: list | np.ndarray, means: list, rows: int, source: object | None
) -> Iterator[_CentredTiles]:
    """The tiles of ``_tiles``, in order, each as ``_CentredTiles``, let go of before the
    next is read."""
    start = 0
    for pieces in _tiles(aligned, rows, source):
        tile = _CentredTiles(pieces, means, slice(start, start + pieces[0].shape[2]))
        del pieces
        yield tile
        start = tile.rows.stop
        tile.pieces = tile.made = None


def _centred_targets(targets: np.ndarray) -> np.ndarray:
    """Science frames (m, y, x) as float64 (m, y·x), each minus its mean (KLIP's target):
    a new array, whatever the frames' type."""
    flat = np.array(targets, dtype=np.float64).reshape(len(targets), -1)
    flat -= flat.mean(axis=1, keepdims=True)
    return flat


def errors_block(
    aligned: list | np.ndarray,
    means: list,
    weights: list,
    rows: int,
    cutoffs: tuple[int, ...],
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """KLIP's ERR (m, len(cutoffs), y, x) float64 of each of m targets, from the references
    aligned to it, a tile of ``rows`` rows at a time (as ``gram_block``), and their KL
    weights (m, 2, p, K): the references' own residuals after projection on the first k KL
    images, for each cutoff k (ascending, at most K). Only the KL images the ERR needs are
    made (up to the largest cutoff below p: at p and beyond the ERR is 0)."""
    weights = _pieces(weights)[0]
    m, out = len(weights), None
    for tile in _centred_tiles(aligned, means, rows, source):
        if out is None:
            ny = source.shape[-2] if source is not None else _pieces(aligned)[0].shape[2]
            out = np.zeros((m, len(cutoffs), ny, tile.nx))
        needed = max((k for k in cutoffs if k < tile.npsf), default=0)
        for i in range(m):
            centred = tile(i)
            centred = centred.copy() if tile.shared and m > 1 else centred  # ERR writes in it
            images = _aligned(weights[i, 0, :, :needed]).T @ centred
            used = np.concatenate([piece[i] for piece in _pieces(means)])
            used = None if np.isfinite(used).all() else np.isfinite(used)  # the flagged: out
            errors = klip.residual_stds(centred, images, weights[i, 1], cutoffs, used)
            out[i, :, tile.rows] = errors.reshape(len(cutoffs), tile.height, tile.nx)
            del images, centred  # before the next target's are made
    return out


def overlaps_block(
    targets: list | np.ndarray,
    aligned: list | np.ndarray,
    means: list,
    rows: int,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """(m, p): each of m targets (science frames, minus their mean) against each of the
    references aligned to it (minus theirs), summed over tiles of ``rows`` rows in order,
    read as ``gram_block`` reads them. With the KL weights W they give the target's
    coefficients on the KL images, Wᵀ·(R − μ)·t, without the images being made."""
    centred_targets = _centred_targets(_whole(targets))
    out = None
    for tile in _centred_tiles(aligned, means, rows, source):
        if out is None:
            out = np.zeros((len(centred_targets), tile.npsf))
        for i, target in enumerate(centred_targets):
            out[i] += tile(i) @ target[tile.pixels]
    return out


def project_block(
    targets: np.ndarray,
    aligned: list | np.ndarray,
    means: list,
    weights: list,
    overlaps: list,
    rows: int,
    cutoffs: tuple[int, ...],
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """psfsub SCI (len(cutoffs), m, y, x) float32 of targets (m, y, x): each minus its mean
    and its projection on its first k KL images for each cutoff k (ascending, at most K),
    made from the references a tile at a time, never from the KL images
    (``klip.reference_mixes``)."""
    weights = _pieces(weights)[0]
    overlaps = _whole(overlaps)
    centred_targets = _centred_targets(targets)
    m, (ny, nx) = len(targets), targets.shape[1:]
    mixes = [
        klip.reference_mixes(_aligned(weights[i, 0]), _aligned(overlaps[i]), cutoffs)
        for i in range(m)
    ]
    out = np.empty((len(cutoffs), m, ny * nx), dtype=np.float32)
    for tile in _centred_tiles(aligned, means, rows, source):
        for i in range(m):
            projection = mixes[i] @ tile(i)
            np.subtract(centred_targets[i, tile.pixels], projection, out=projection)
            out[:, i, tile.pixels] = projection
            del projection
    return out.reshape(len(cutoffs), m, ny, nx)
