"""The functions dask runs on each block of klip (``steps.klip``): each task takes a block
of targets (science integrations) and passes over the references aligned to them a tile of
frame rows at a time (the blocks dask hands over, or read from psfalign on disk), calling
the numpy kernels (``kernels.klip``, ``kernels.zones``).

With ``zones`` (``kernels.zones.Zones``: pyKLIP's annuli × subsections) every quantity is
per (target, zone): the references' and the targets' means are over the zone's pixels, and
a tile's pixels are taken in the order of their zones so that each zone's Gram matrix,
overlaps, ERR and projection are products over a run of columns, each pixel used once:
the same flops as one zone. Without zones (None) the whole frame is one zone and the
arithmetic is that of the whole-frame KLIP, bit for bit (frame means, tiles in order).

Arrays along the references come in pieces along the reference axis (``_pieces``);
means are (m, p, Z), Gram matrices (m, Z, p, p [+ 1]), KL weights (m, Z, 2, p, K),
overlaps (m, Z, p), a reference choice (m, Z, p) bool.
"""

from collections.abc import Callable, Iterator
from functools import partial

import numpy as np

from coron_dask.kernels import klip
from coron_dask.kernels.zones import GATHER, Zones, zone_means


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array``, or a copy of it if its data are not aligned for its dtype. distributed
    hands a task the arrays it received as views into the bytes read, at any offset, and
    numpy multiplies a misaligned matrix by a vector without BLAS, adding up in another
    order: KLIP's result would otherwise depend on which worker made its KL weights. One
    target's matrices at a time: a broadcast block (``align_to="first"``) stays a view."""
    return array if array.flags.aligned else array.copy()


def _pieces(blocks: list) -> list:
    """Blocks dask hands over along contracted axes, flattened to one list."""
    return [b for inner in blocks for b in _pieces(inner)] if isinstance(blocks, list) else [blocks]


def means_block(refs: np.ndarray, zones: Zones | None = None) -> np.ndarray:
    """Means (..., p, Z) float64 of reference frames (..., p, y, x): over the whole frame
    (Z = 1), or over each zone's pixels."""
    if zones is None:
        return klip.frame_means(refs)[..., None]
    return zone_means(refs, zones)


def summary(zones: Zones | None) -> Callable[[np.ndarray], np.ndarray]:
    """What the task that writes an aligned block hands on (``io.staging.write_blocks``):
    the frames' means, or their zones' means (``means_block``)."""
    return klip.frame_means if zones is None else partial(zone_means, zones=zones)


def _centred_tile(pieces: list, means: list, i: int, tile: "_Tile") -> np.ndarray:
    """The references aligned to target ``i`` on a tile, as one float64 (p, columns) array
    minus their means, from the pieces (m, p_j, rows, nx) they are held in along the
    reference axis: the tile itself is never copied in float32. Without zones, the columns
    are the tile's pixels in order, minus the frame means; with zones, the pixels in zones
    sorted by zone (``tile.runs``), each run minus its zone's means. A reference flagged
    for the target (a frame with a non-finite mean: NaN, ``shift_block``) is a row of
    zeros, which ``klip.kl_weights`` leaves out."""
    rows = [piece[i].reshape(piece.shape[1], -1) for piece in _pieces(pieces)]
    means = np.concatenate([m[i] for m in _pieces(means)])
    if tile.zones is None:
        centred = np.empty((sum(r.shape[0] for r in rows), rows[0].shape[1]))
        start = 0
        for r in rows:
            centred[start : start + len(r)] = r
            start += len(r)
        centred -= means
        flagged = ~np.isfinite(means[:, 0])  # NaN frames: fits that did not converge
        if flagged.any():  # rows of 0: nothing in the Gram matrix, the overlaps, the projection
            centred[flagged] = 0.0
        return centred
    centred = np.empty((len(means), len(tile.order)))
    start, buffer = 0, np.empty((GATHER, rows[0].shape[1]))
    for r in rows:  # a few references at a time to float64, then gathered in zone order
        for first in range(0, len(r), GATHER):
            part = buffer[: len(r[first : first + GATHER])]
            part[...] = r[first : first + GATHER]
            np.take(part, tile.order, axis=1, out=centred[start : start + len(part)], mode="clip")
            start += len(part)
    for z, run in tile.runs:
        centred[:, run] -= means[:, z, None]
        flagged = ~np.isfinite(means[:, z])
        if flagged.any():
            centred[flagged, run] = 0.0
    return centred


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


class _Tile:
    """The references on one tile (pieces as ``_tiles`` yields them) minus their means, for
    target after target: made once when every target has the same references (a leading
    axis of one, or broadcast: ``align_to="first"``), else one target's at a time.
    ``runs``: (zone, columns) of each zone in the tile; ``place(run)``: where those
    columns are in a flat frame."""

    def __init__(self, pieces: list, means: list, rows: slice, zones: Zones | None) -> None:
        self.pieces, self.means, self.rows, self.zones = pieces, means, rows, zones
        first = pieces[0]
        self.npsf = sum(piece.shape[1] for piece in pieces)
        self.height, self.nx = first.shape[2:]
        self.pixels = slice(rows.start * self.nx, rows.stop * self.nx)  # in a flat frame
        self.shared = first.shape[0] == 1 or first.strides[0] == 0
        self.made = None
        if zones is None:
            self.order, self.runs = None, [(0, slice(None))]
        else:
            found, self.runs = zones.segments(self.pixels)
            self.order = found - self.pixels.start  # in the tile

    def place(self, run: slice) -> slice | np.ndarray:
        return self.pixels if self.order is None else self.order[run] + self.pixels.start

    def target(self, centred: np.ndarray) -> np.ndarray:
        """A centred target's (y·x) values on the tile's columns."""
        return centred[self.pixels] if self.order is None else centred[self.place(slice(None))]

    def __call__(self, i: int) -> np.ndarray:
        if not self.shared:
            return _centred_tile(self.pieces, self.means, i, self)
        if self.made is None:
            self.made = _centred_tile(self.pieces, self.means, 0, self)
        return self.made


def centred_tiles(
    aligned: list | np.ndarray, means: list, rows: int, source: object | None, zones
) -> Iterator[_Tile]:
    """The tiles of ``_tiles``, in order, each as ``_Tile``, let go of before the next is
    read."""
    start = 0
    for pieces in _tiles(aligned, rows, source):
        tile = _Tile(pieces, means, slice(start, start + pieces[0].shape[2]), zones)
        del pieces
        yield tile
        start = tile.rows.stop
        tile.pieces = tile.made = None


def joined(blocks: list | np.ndarray) -> np.ndarray:
    """A block dask hands over in pieces along contracted axes (nested lists), joined (no
    copy when it is one piece)."""
    pieces = _pieces(blocks)
    return pieces[0] if len(pieces) == 1 else np.block(blocks)


def centre_targets(targets: np.ndarray, zones: Zones | None) -> np.ndarray:
    """Science frames (m, y, x) as float64 (m, y·x), each minus its mean over the frame
    or, with zones, over each zone (0 in no zone): KLIP's targets; a new array, whatever
    the frames' type."""
    flat = np.array(targets, dtype=np.float64).reshape(len(targets), -1)
    if zones is None:
        flat -= flat.mean(axis=1, keepdims=True)
        return flat
    labels = zones.labels.ravel()
    outside = labels < 0
    for row, means in zip(flat, zone_means(targets, zones), strict=True):
        row -= means[labels]
        row[outside] = 0.0
    return flat


def gram_block(
    aligned: list | np.ndarray,
    means: list,
    targets: list | np.ndarray | None,
    rows: int,
    zones: Zones | None = None,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """Gram matrices (m, Z, p, p) of the mean-subtracted references aligned to each of m
    targets, in each zone, summed over tiles of ``rows`` rows in order (``_tiles``: from
    the blocks, or read from ``source`` once the tasks ``after`` stands for wrote them).
    With ``targets`` (m, y, x), each is bordered by its target's overlaps with the
    references, (m, Z, p, p + 1), summed as ``overlaps_block`` sums them: the pass over the
    references that makes the Gram matrix makes the overlaps too."""
    count = 1 if zones is None else zones.count
    centred_targets = None if targets is None else centre_targets(joined(targets), zones)
    out = None
    for tile in centred_tiles(aligned, means, rows, source, zones):
        p = tile.npsf
        if out is None:
            bordered = 0 if centred_targets is None else 1
            out = np.zeros((len(tile.pieces[0]), count, p, p + bordered))
        for i in range(len(out)):
            centred = tile(i)
            target = None if centred_targets is None else tile.target(centred_targets[i])
            for z, run in tile.runs:
                part = centred[:, run]
                out[i, z, :, :p] += part @ part.T
                if target is not None:
                    out[i, z, :, p] += part @ target[run]
            centred = part = None  # let go of before the next target's is made
    return out


def weights_block(
    grams: np.ndarray, npix: int | np.ndarray, truncate: int, chosen: np.ndarray | None = None
) -> np.ndarray:
    """KL weights W and C (m, Z, 2, p, K) of each of m targets in each zone from its Gram
    matrix (m, Z, p, p), or (m, Z, p, p + 1) bordered by the overlaps (``gram_block``),
    over ``npix`` pixels (one count, or one per zone): each matrix is taken out whole
    (contiguous, aligned), so that the weights are those of an unbordered one. ``chosen``
    (m, Z, p) bool: the references each (target, zone) may use (default: all)."""
    m, count, p = grams.shape[:3]
    pixels = np.broadcast_to(npix, (count,))
    out = np.empty((m, count, 2, p, min(truncate, p)))
    for i in range(m):
        for z in range(count):
            gram = _aligned(np.ascontiguousarray(grams[i, z, :, :p]))
            used = None if chosen is None else chosen[i, z]
            out[i, z] = klip.kl_weights(gram, int(pixels[z]), truncate, used)
    return out


def errors_block(
    aligned: list | np.ndarray,
    means: list,
    weights: list,
    rows: int,
    cutoffs: tuple[int, ...],
    zones: Zones | None = None,
    chosen: list | None = None,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """KLIP's ERR (m, len(cutoffs), y, x) float64 of each of m targets, from the references
    aligned to it, a tile of ``rows`` rows at a time (as ``gram_block``), and their KL
    weights (m, Z, 2, p, K): in each zone, the deviation over the references (those chosen,
    not flagged) of their own residuals after projection on the zone's first k KL images,
    for each cutoff k (ascending, at most K); NaN in no zone. Only the KL images the ERR
    needs are made (up to the largest cutoff below p: at p and beyond the ERR is 0)."""
    weights = _pieces(weights)[0]
    chosen = None if chosen is None else joined(chosen)
    m, out = len(weights), None
    for tile in centred_tiles(aligned, means, rows, source, zones):
        if out is None:
            ny = source.shape[-2] if source is not None else _pieces(aligned)[0].shape[2]
            out = np.full((m, len(cutoffs), ny * tile.nx), 0.0 if zones is None else np.nan)
        needed = max((k for k in cutoffs if k < tile.npsf), default=0)
        for i in range(m):
            centred = tile(i)
            centred = centred.copy() if tile.shared and m > 1 else centred  # ERR writes in it
            finite = np.isfinite(np.concatenate([piece[i] for piece in _pieces(means)]))
            for z, run in tile.runs:
                part, coefficients = centred[:, run], weights[i, z, 1]
                used = finite[:, z] if chosen is None else finite[:, z] & chosen[i, z]
                kept = weights[i, z, 0, :, :needed]
                if chosen is not None:  # the chosen only: the others have no weight
                    taken = np.flatnonzero(used)
                    part, kept, coefficients = part[taken], kept[taken], coefficients[taken]
                    used = used[taken]
                images = _aligned(kept).T @ part
                used = None if used.all() else used  # the flagged, those not chosen: out
                errors = klip.residual_stds(part, images, coefficients, cutoffs, used)
                out[i][:, tile.place(run)] = errors
                del images
            centred = part = None  # let go of before the next target's is made
    return out.reshape(m, len(cutoffs), -1, tile.nx)


def overlaps_block(
    targets: list | np.ndarray,
    aligned: list | np.ndarray,
    means: list,
    rows: int,
    zones: Zones | None = None,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """(m, Z, p): each of m targets (science frames, minus their means) against each of the
    references aligned to it (minus theirs) in each zone, summed over tiles of ``rows``
    rows in order, read as ``gram_block`` reads them. With the KL weights W they give the
    target's coefficients on the KL images, Wᵀ·(R − μ)·t, without the images being made."""
    centred_targets = centre_targets(joined(targets), zones)
    count = 1 if zones is None else zones.count
    out = None
    for tile in centred_tiles(aligned, means, rows, source, zones):
        if out is None:
            out = np.zeros((len(centred_targets), count, tile.npsf))
        for i, target in enumerate(centred_targets):
            centred, values = tile(i), tile.target(target)
            for z, run in tile.runs:
                out[i, z] += centred[:, run] @ values[run]
            centred = None  # let go of before the next target's is made
    return out


def project_block(
    targets: np.ndarray,
    aligned: list | np.ndarray,
    means: list,
    weights: list,
    overlaps: list,
    rows: int,
    cutoffs: tuple[int, ...],
    zones: Zones | None = None,
    source: object | None = None,
    after: object = None,
) -> np.ndarray:
    """psfsub SCI (len(cutoffs), m, y, x) float32 of targets (m, y, x): each minus its mean
    and its projection on its first k KL images for each cutoff k (ascending, at most K),
    zone by zone (NaN in no zone), made from the references a tile at a time, never from
    the KL images (``klip.reference_mixes``)."""
    weights = _pieces(weights)[0]
    overlaps = joined(overlaps)
    centred_targets = centre_targets(targets, zones)
    m, (ny, nx) = len(targets), targets.shape[1:]
    mixes = [
        [
            klip.reference_mixes(_aligned(weights[i, z, 0]), _aligned(overlaps[i, z]), cutoffs)
            for z in range(weights.shape[1])
        ]
        for i in range(m)
    ]
    out = np.empty((len(cutoffs), m, ny * nx), dtype=np.float32)
    if zones is not None:
        out[...] = np.nan
    for tile in centred_tiles(aligned, means, rows, source, zones):
        for i in range(m):
            centred, values = tile(i), tile.target(centred_targets[i])
            for z, run in tile.runs:
                projection = mixes[i][z] @ centred[:, run]
                np.subtract(values[run], projection, out=projection)
                out[:, i][:, tile.place(run)] = projection
                del projection
            centred = None  # let go of before the next target's is made
    return out.reshape(len(cutoffs), m, ny, nx)
