"""What an ADI companion fit by negative injection (``kernels.negative_injection``) needs of
a science exposure's KLIP, lazily: on a few pixels U (windows about the companion's place
in the science and in the other rolls' aligned integrations), the references aligned to
each target and the target, each minus its zone means; and, in the zones U touches, the
references' Gram matrices, their overlaps with the target and the references each zone
uses (ADI's movement); and the alignment's shifts of the references (``reference_moves``).

With a 3-D psfalign (``align_to="first"``) one basis serves every integration, KLIP is
linear in the target, and the integration-mean psfsub is that of the integrations' mean:
one target (b = 1). With a basis per integration, b = m. Reading: the aligned frames are
read as the contrast's ADI injections read them (``aligned_on_disk``).
"""

from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.steps.klip import KLBasis, target_overlaps
from coron_dask.steps.klip_blocks import means_block


@dataclass(frozen=True)
class Pixels:
    """The pixels U of one companion in one exposure: their flat indices in the frame
    (u,), each one's zone (−1: none), and the rectangles (y0, y1, x0, x1) they come from."""

    flat: np.ndarray
    labels: np.ndarray
    rectangles: tuple[tuple[int, int, int, int], ...]


def window_pixels(
    corners: list[tuple[int, int]],
    shapes: list[tuple[int, int]],
    frame: tuple[int, int],
    labels: np.ndarray | None,
) -> Pixels:
    """U: the frame pixels of windows of ``shapes`` at ``corners`` (y0, x0), each once,
    cut at the frame's edges; ``labels`` the frame's zone map (None: one zone)."""
    rectangles, flat = [], []
    for (y0, x0), shape in zip(corners, shapes, strict=True):
        y1, x1 = min(y0 + shape[0], frame[0]), min(x0 + shape[1], frame[1])
        y0, x0 = max(y0, 0), max(x0, 0)
        if y0 < y1 and x0 < x1:
            rectangles.append((int(y0), int(y1), int(x0), int(x1)))
            yy, xx = np.mgrid[y0:y1, x0:x1]
            flat.append((yy * frame[1] + xx).ravel())
    pixels = np.unique(np.concatenate(flat))
    zone = np.zeros(frame[0] * frame[1], np.int32) if labels is None else labels.ravel()
    return Pixels(pixels, zone[pixels].astype(np.int32), tuple(rectangles))


def rectangle_places(
    flat: np.ndarray, rectangles: tuple[tuple[int, int, int, int], ...], frame_x: int
) -> list[np.ndarray]:
    """Where each rectangle's pixels (y0, y1, x0, x1, row by row) are among U's ``flat``
    frame indices (sorted), in a frame ``frame_x`` wide."""
    places = []
    for y0, y1, x0, x1 in rectangles:
        yy, xx = np.mgrid[y0:y1, x0:x1]
        places.append(np.searchsorted(flat, (yy * frame_x + xx).ravel()))
    return places


def _gather(rects: list[np.ndarray], pixels: Pixels, frame_x: int) -> np.ndarray:
    """Values (..., u) on U from the rectangles' blocks (..., ry, rx)."""
    places = rectangle_places(pixels.flat, pixels.rectangles, frame_x)
    out = np.zeros((*rects[0].shape[:-2], len(pixels.flat)))
    for block, where in zip(rects, places, strict=True):
        out[..., where] = block.reshape(*block.shape[:-2], -1)
    return out


def window_block(
    refs: list,
    means: np.ndarray,
    targets: list,
    target_means: np.ndarray,
    gram: np.ndarray,
    overlaps: np.ndarray,
    chosen: np.ndarray | None,
    pixels: Pixels,
    frame_x: int,
) -> dict:
    """The arrays of ``adi_windows`` for one exposure and one companion, in numpy: the
    task (``planning.memory.companion_adi`` counts it)."""
    centred = _gather(refs, pixels, frame_x)  # (b, p, u)
    labels = pixels.labels
    inside = labels >= 0
    centred[..., inside] -= np.take_along_axis(
        means, np.broadcast_to(labels[inside], (*means.shape[:2], inside.sum())), axis=2
    )
    centred[..., ~inside] = 0.0
    centred[~np.isfinite(means[:, :, 0])] = 0.0  # flagged for the target: KLIP's zero row
    target = _gather(targets, pixels, frame_x)  # (b, u)
    target[:, inside] -= target_means[:, labels[inside]]
    target[:, ~inside] = 0.0
    p = centred.shape[1]
    used = np.ones(overlaps.shape, bool) if chosen is None else chosen  # (b, Z', p)
    return {
        "centred": centred,
        "target": target,
        "gram": gram[..., :p],
        "overlaps": overlaps,
        "used": used.astype(np.uint8),
    }


def reference_moves(psfalign: xr.Dataset) -> da.Array:
    """(b, p, 2): the alignment's (dx, dy) of every reference to each target (a frame
    aligned to the target is the frame moved by −(dx, dy)); b = 1 with a 3-D psfalign."""
    fit = psfalign["fit"].data[..., :2].astype(np.float64)
    return fit[None] if fit.ndim == 2 else fit


def adi_windows(basis: KLBasis, psfalign: xr.Dataset, pixels: Pixels) -> dict[str, da.Array]:
    """For one science exposure's ``basis`` (an ADI reduction's) and companion ``pixels``
    U: ``centred`` (b, p, u), ``target`` (b, u), and in the zones U touches (ascending)
    ``gram`` (b, Z', p, p), ``overlaps`` (b, Z', p), ``used`` (b, Z', p) uint8. Lazy,
    one task."""
    aligned = aligned_on_disk(basis, psfalign)
    science = basis.science  # the filled cube KLIP subtracts from
    shared = aligned.ndim == 3
    zone_list = np.unique(pixels.labels[pixels.labels >= 0])
    frame_x, zones = science.shape[2], basis.zones
    target_means = da.map_blocks(
        means_block,
        science,
        zones,
        drop_axis=(1, 2),
        new_axis=1,
        chunks=(science.chunks[0], (1 if zones is None else zones.count,)),
        dtype=np.float64,
    )
    overlaps = target_overlaps(basis)
    if shared:  # one target: the integrations' mean (KLIP is linear in it)
        refs = [aligned[None, :, y0:y1, x0:x1] for y0, y1, x0, x1 in pixels.rectangles]
        targets = [
            science[:, y0:y1, x0:x1].mean(axis=0)[None] for y0, y1, x0, x1 in pixels.rectangles
        ]
        means = basis.means[:1]
        target_means = target_means.mean(axis=0)[None]
        overlaps = overlaps.mean(axis=0)[None]
        gram, chosen = basis.gram, None if basis.chosen is None else basis.chosen[:1]
    else:
        refs = [aligned[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in pixels.rectangles]
        targets = [science[:, y0:y1, x0:x1] for y0, y1, x0, x1 in pixels.rectangles]
        means, gram, chosen = basis.means, basis.gram, basis.chosen
    # the zones U touches only: a task never holds every zone's Gram matrices
    gram, overlaps = gram[:, zone_list], overlaps[:, zone_list]
    chosen = None if chosen is None else chosen[:, zone_list]
    work = dask.delayed(window_block, pure=True)(
        refs, means, targets, target_means, gram, overlaps, chosen, pixels, frame_x
    )
    b = 1 if shared else science.shape[0]
    p, u, z = aligned.shape[-3], len(pixels.flat), len(zone_list)
    shapes = {
        "centred": ((b, p, u), np.float64),
        "target": ((b, u), np.float64),
        "gram": ((b, z, p, p), np.float64),
        "overlaps": ((b, z, p), np.float64),
        "used": ((b, z, p), np.uint8),
    }
    name = tokenize(basis.weights, pixels.flat, aligned)
    return {
        key: da.from_delayed(work[key], shape, dtype=dtype, name=f"companion-adi-{key}-{name}")
        for key, (shape, dtype) in shapes.items()
    }


def aligned_on_disk(basis: KLBasis, psfalign: xr.Dataset) -> da.Array:
    """psfalign's SCI as KLIP reads it: from the file the alignment wrote (``basis``'s
    reading), a block of targets a task, once the writes of that block have run, so that no
    aligned frame waits in memory for the injections; the lazy frames where none was
    written."""
    if not basis.reading:
        return psfalign["sci"].data
    source, _, written = basis.reading[:3]
    frame = {"y": psfalign.sizes["y"], "x": psfalign.sizes["x"]}
    if psfalign["sci"].ndim == 3:  # one set of references, read whole by one task
        after = written.reshape(-1).rechunk(-1)
        return da.blockwise(
            _read_all,
            "pyx",
            after,
            "a",
            source,
            None,
            new_axes={"p": psfalign.sizes["psf"], **frame},
            concatenate=True,
            dtype=np.float32,
            name="inject-read-aligned-" + tokenize(source, after),
        )
    targets, _ = basis.references
    return da.blockwise(
        _read_aligned,
        "mpyx",
        targets,
        "m",
        source,
        None,
        written.rechunk({1: -1}),
        "mpz",
        new_axes=frame,
        concatenate=True,
        dtype=np.float32,
        name="inject-read-aligned-" + tokenize(targets, source, written),
    )


def _read_aligned(targets: np.ndarray, source: object, after: object) -> np.ndarray:
    """The aligned frames of ``targets`` (indices into a 4-D psfalign) read from ``source``."""
    return np.asarray(source[int(targets[0]) : int(targets[-1]) + 1], dtype=np.float32)


def _read_all(after: object, source: object) -> np.ndarray:
    """A 3-D psfalign read whole from ``source``."""
    return np.asarray(source[:], dtype=np.float32)
