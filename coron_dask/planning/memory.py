"""What each kind of task needs in memory, as a function of its block: the model the block
planner (``chunking``) sizes blocks with, checked against peaks measured on a worker
(tests/test_memory.py).

A task's peak is everything that must be in memory while it runs: its inputs, its output
and its working set, in bytes. The working sets follow the block functions in
``kernels.blocks``, which keep their temporaries to a frame or a batch of frames. A worker
also holds what waits between tasks (``held``, ``waiting``) on top of its own baseline.
"""

from dataclasses import dataclass

from coron_dask.io.fitsfile import WRITE_BUFFER
from coron_dask.kernels.klip import PROJECTION_COLUMNS
from coron_dask.kernels.median_fill import FILL_BATCH
from coron_dask.kernels.registration import fit_batch, shift_batch
from coron_dask.kernels.zones import GATHER, means_batch

MIB = 2**20
#: What a task's resident memory exceeds its arrays by: Python and numpy objects, 4 KiB
#: page rounding and heap fragments; measured on a worker (tests/test_memory.py), whose
#: transparent huge pages are off (``workers.configure_memory``): 0.3 MiB, up to 1.3 MiB
#: under load.
TASK_OVERHEAD = 2 * MIB
#: Reduction fan-in of the i2d sums (``steps.reductions.tree_sum``).
SPLIT_EVERY = 4
#: glibc malloc on the workers (``cluster.WORKER_ENVIRON``): arrays of 32 MiB and more are
#: mapped and unmapped whole; smaller ones reuse the heap, and each heap (arena, at most
#: two) keeps up to 32 MiB of freed memory instead of returning it to the system (a
#: lower threshold slows the shift fit by a fifth: it maps its temporaries afresh).
MALLOC = {"MMAP_THRESHOLD": 2**25, "TRIM_THRESHOLD": 2**25, "ARENA_MAX": 2}
#: What a worker's resident memory may exceed its arrays by, besides its baseline: the
#: freed memory its heaps keep (distributed calls it unmanaged memory).
WORKER_RETAINED = MALLOC["ARENA_MAX"] * MALLOC["TRIM_THRESHOLD"]


@dataclass(frozen=True)
class Frame:
    """The frame size, and the sizes of the arrays the model counts in."""

    ny: int
    nx: int

    @property
    def pixels(self) -> int:
        return self.ny * self.nx

    @property
    def spectrum(self) -> int:
        """Bytes of one complex rfft2 spectrum (float64)."""
        return self.ny * (self.nx // 2 + 1) * 16


def read(frames: int, pixels: int, itemsize: int = 4) -> int:
    """Read ``frames`` × ``pixels`` of one extension: the result only."""
    return frames * pixels * itemsize + TASK_OVERHEAD


def outlier_median(nints: int, rows: int, nx: int) -> int:
    """Median over ``nints`` integrations of a slab of ``rows`` rows: SCI and DQ slabs, the
    masked copy and its sorted copy, and a few per-pixel arrays."""
    slab = nints * rows * nx
    return 16 * slab + 64 * rows * nx + TASK_OVERHEAD


def outlier_flag(frames: int, frame: Frame) -> int:
    """One of SCI, ERR, DQ flagged for ``frames`` integrations: SCI, ERR, DQ and the median
    in, the output, per-frame temporaries."""
    return 16 * frames * frame.pixels + 40 * frame.pixels + TASK_OVERHEAD


def fill(frames: int, frame: Frame, box: int = 3) -> int:
    """Median fill of ``frames`` frames: image, SCI and DQ in (the image is SCI itself when
    SCI is filled), the output, per frame the bad mask, a padded float64 copy and a batch
    of windows."""
    pad = (frame.ny + box) * (frame.nx + box) * 8
    # a batch of FILL_BATCH windows of (2·(box // 2) + 1)² pixels: gathered, those with a
    # good pixel, and nanmedian's masked, sorted copies; measured 53 bytes a window pixel
    # (box 3), 48 (box 5)
    windows = FILL_BATCH * (2 * (box // 2) + 1) ** 2 * 56
    return 16 * frames * frame.pixels + 24 * frame.pixels + pad + windows + TASK_OVERHEAD


def fit(frames: int, psfs: int, frame: Frame) -> int:
    """Shift fit of ``psfs`` references to ``frames`` science frames: both in (float32), the
    PSFMASK and what the fit keeps of it (w² and FFT(w²) on the doubled frequencies: 48
    bytes a pixel), every reference's part of the overlaps (8 bytes a pixel, shared by the
    science frames), and the larger of: a batch of references being transformed (float64
    frames, weighted, their spectra: 26 bytes a pixel each), and a science frame's terms
    (its spectrum, the autoconvolution on a doubled grid with its FFTs' buffers, E's
    terms: about 200 bytes a pixel, ``registration._Problem``) with a batch's overlaps M in
    flight (16 bytes a pixel each). Measured (tests/test_memory.py): the batch's peak is
    the larger one on 64² frames, the science frame's on 160², where a worker measured
    16.0 to 18.0 MiB for 2 frames × 20 references (numpy's own arrays: 13.7 MiB; the rest
    is the FFTs' buffers and the heap's fragments)."""
    batch = min(psfs, fit_batch(frame.pixels))
    inputs = 4 * (frames + psfs) * frame.pixels + 8 * frame.pixels
    kept = (48 + 8 * psfs) * frame.pixels
    peak = max(26 * batch, 200 + 16 * batch) * frame.pixels
    # the overhead every task has: without it a fit of 64x64 frames measured 1.3 MiB above
    return inputs + kept + peak + TASK_OVERHEAD


def shift(
    frames: int, psfs: int, frame: Frame, zarr: bool = False, zones: int | None = None
) -> int:
    """Fourier shift of ``psfs`` references to ``frames`` targets: references in (float32),
    the output (float32), and the block's batch buffers: float64 frames, their spectra and
    the shifted spectra (``kernels.blocks.shift_block``); then the copy the task makes to
    write its block (``io.products.write_block``) into a FITS file, a run of references at
    a time, and with ``zarr`` into a Zarr store too, whole; with ``zones``, the means of
    its frames over each zone (``zone_means``)."""
    # the batch is shift_block's (uncapped: 64 frames of 64x64), not the fit's
    batch = min(psfs, shift_batch(frame.pixels))
    per_batch = batch * (8 * frame.pixels + 2 * frame.spectrum)
    output = 4 * psfs * frame.pixels * frames
    copy = output if zarr else min(4 * psfs * frame.pixels, WRITE_BUFFER)
    # the zone means after the shift: its batch buffers, freed, may stay in the heap
    means = 0 if zones is None else zone_means(frames * psfs, frame, zones)
    return 4 * psfs * frame.pixels + output + max(per_batch, copy) + means + TASK_OVERHEAD


#: Bytes a pixel of the zone map a task is given: its labels (int16) and the pixels in
#: zones in zone order (int64).
ZONE_MAP = 10


def zone_means(frames: int, frame: Frame, zones: int) -> int:
    """The means of ``frames`` frames over each of ``zones`` zones: a batch of frames'
    pixels gathered (float32, then float64), the means."""
    batch = min(frames, means_batch(frame.pixels))
    return 12 * batch * frame.pixels + 8 * frames * zones + ZONE_MAP * frame.pixels


def _zoned(frames: int, frame: Frame, tile: int, zones: int | None, targets: bool) -> int:
    """What a KLIP task adds with zones: a tile's pixels in zone order (their labels, the
    order and the places: 32 bytes a pixel), a few references gathered (float64); with
    ``targets``, their zone means and one target's zone means spread over its pixels."""
    if zones is None:
        return 0
    own = zone_means(frames, frame, zones) + 8 * frame.pixels if targets else 0
    return ZONE_MAP * frame.pixels + 32 * tile + 8 * GATHER * tile + own


def klip_gram(
    frames: int, npsf: int, rows: int, frame: Frame, own: bool = False, zones: int | None = None
) -> int:
    """Gram matrices of ``frames`` targets' references (one per zone of ``zones``; None: the
    whole frame), summed over tiles of ``rows`` rows: a tile, one target's float64 centred
    copy of it, the matrices and a product; with ``own`` (a basis per integration)
    bordered by the overlaps of the integrations, which the task holds (float32) with their
    centred float64 copy."""
    tile = rows * frame.nx
    targets = 12 * frames * frame.pixels if own else 0
    matrices = 8 * (frames * (zones or 1) + 1) * npsf * (npsf + own)
    zoned = _zoned(frames, frame, tile, zones, own)
    return 4 * frames * npsf * tile + 8 * npsf * tile + matrices + targets + zoned + TASK_OVERHEAD


def klip_weights(frames: int, npsf: int, count: int, zones: int | None = None) -> int:
    """Eigen-decompositions of the Gram matrices (one per zone): the matrices (bordered by
    the overlaps), one taken out whole and scaled, LAPACK's work, the weights of ``count``
    KL modes (the largest cutoff, at most ``npsf``)."""
    sets = frames * (zones or 1)
    matrices = 8 * sets * npsf * (npsf + 1) + (2 + 6) * 8 * npsf**2
    return matrices + 16 * sets * npsf * count + TASK_OVERHEAD


def klip_errors(
    frames: int,
    npsf: int,
    rows: int,
    frame: Frame,
    count: int,
    planes: int = 1,
    zones: int | None = None,
) -> int:
    """KLIP's ERR for each cutoff (``planes``) of ``frames`` targets from ``count`` KL
    images (the largest cutoff below ``npsf``), made a tile of ``rows`` rows at a time: a
    tile, the weights, the output (whole frames), and for one target at a time the float64
    centred tile (the ERR works in it), its KL images, its ERR on the tile, and for a slice
    of PROJECTION_COLUMNS pixels the projection and the standard deviation's copy."""
    tile = rows * frame.nx
    columns = min(tile, PROJECTION_COLUMNS)
    return (
        4 * frames * npsf * tile
        + 16 * frames * (zones or 1) * npsf * count
        + 8 * npsf * tile
        + 8 * (count + planes) * tile
        + 16 * npsf * columns
        + 8 * frames * planes * frame.pixels
        + _zoned(frames, frame, tile, zones, False)
        + TASK_OVERHEAD
    )


def klip_overlaps(
    frames: int, npsf: int, rows: int, frame: Frame, shared: bool, zones: int | None = None
) -> int:
    """Overlaps of ``frames`` targets with their references (in each zone), a tile of
    ``rows`` rows at a time: the targets (float32) and their centred float64 copy, a tile
    of references (one set for all targets if ``shared``) and one target's float64
    centred copy of it."""
    tile = rows * frame.nx
    sets = 1 if shared else frames
    zoned = _zoned(frames, frame, tile, zones, True) + 8 * frames * (zones or 1) * npsf
    return (
        12 * frames * frame.pixels + 4 * sets * npsf * tile + 8 * npsf * tile + zoned
    ) + TASK_OVERHEAD


def klip_norms(
    frames: int, npsf: int, rows: int, frame: Frame, shared: bool, zones: int | None = None
) -> int:
    """The pass before a choice of references (``selection_blocks.norms_block``): the
    overlaps' (``klip_overlaps``) and each reference's squared norm in each zone."""
    return (
        klip_overlaps(frames, npsf, rows, frame, shared, zones) + 8 * frames * (zones or 1) * npsf
    )


def klip_chosen_gram(
    frames: int, npsf: int, kept: int, rows: int, frame: Frame, shared: bool, zones=None
) -> int:
    """Gram matrices of the ``kept`` references chosen for each of ``frames`` targets and
    zone (``selection_blocks.chosen_gram_block``): a tile of all ``npsf`` references (one
    set if ``shared``), one target's float64 centred copy of it, the chosen rows of a
    zone's run gathered, the matrices (K² a zone) and the indices."""
    tile = rows * frame.nx
    sets = 1 if shared else frames
    matrices = 8 * frames * (zones or 1) * kept * (kept + 1)
    return (
        4 * sets * npsf * tile
        + 8 * npsf * tile
        + 16 * kept * tile
        + matrices
        + _zoned(frames, frame, tile, zones, False)
        + TASK_OVERHEAD
    )


def klip_chosen_weights(frames: int, npsf: int, kept: int, count: int, zones=None) -> int:
    """Eigen-decompositions of the chosen references' Gram matrices (K × K, one per zone),
    LAPACK's work, the weights spread over the ``npsf`` references (a bound: the rows of
    references not chosen stay zero pages, never touched, when K ≪ p)."""
    sets = frames * (zones or 1)
    return (
        8 * sets * kept * (kept + 1)
        + (2 + 6) * 8 * kept**2
        + (16 * sets * npsf * count + 16 * kept * count)
        + TASK_OVERHEAD
    )


def klip_project(
    frames: int,
    npsf: int,
    rows: int,
    frame: Frame,
    count: int,
    shared: bool,
    planes: int = 1,
    zones: int | None = None,
) -> int:
    """Subtraction for ``frames`` targets, one image per cutoff (``planes``), a tile of
    ``rows`` rows at a time: the targets and their centred float64 copy, the KL weights
    (one set if ``shared``; one per zone), the mixes of references, the output (float32),
    a tile of references, one target's float64 centred copy of it and its projections on
    the tile."""
    tile = rows * frame.nx
    sets = (1 if shared else frames) * (zones or 1)
    return (
        12 * frames * frame.pixels
        + 16 * sets * npsf * count
        + 8 * frames * (zones or 1) * planes * npsf
        + 4 * planes * frames * frame.pixels
        + 4 * (1 if shared else frames) * npsf * tile
        + 8 * npsf * tile
        + 8 * planes * tile
        + _zoned(frames, frame, tile, zones, True)
        + TASK_OVERHEAD
    )


def companion_windows(
    frames: int,
    npsf: int,
    count: int,
    window: tuple[int, int],
    frame: Frame,
    windows: int = 1,
    zones: int | None = None,
) -> int:
    """The KL images of ``frames`` targets on ``windows`` windows of ``window`` (wy, wx)
    pixels (``steps.forward_model.windows_block``): the references' means and ``count``
    KL weights (one per zone), the output (float64), the whole rows a window spans read for
    one target's ``npsf`` references (float32; the one set of all targets if ``shared``),
    for one zone its references on the zone's pixels (gathered float32, float64, centred)
    and their images; the zone map."""
    wy, wx = window
    sets = zones or 1
    inputs = 8 * frames * npsf * sets + 16 * frames * sets * npsf * count
    output = 8 * windows * frames * count * wy * wx
    rows = 4 * npsf * wy * frame.nx
    work = 20 * npsf * wy * wx + 8 * count * wy * wx
    labels = (4 + ZONE_MAP) * frame.pixels + 4 * windows * wy * wx
    return inputs + output + rows + work + labels + TASK_OVERHEAD


def resample(frames: int, frame: Frame, grid_pixels: int, planes: int = 1) -> int:
    """Drizzle of ``frames`` integrations, each with an image per KL cutoff (``planes``):
    SCI, ERR, variance, DQ and the pixel map in, every frame's weights (float32) and
    weighted ERR² (float64), per-frame temporaries, drizzle's output and weight images and
    the float64 block sum."""
    return (
        4 * (planes + 3) * frames * frame.pixels
        + 12 * frames * frame.pixels
        + 16 * frame.pixels
        + 40 * frame.pixels
        + (16 + 8 * (planes + 2)) * grid_pixels
        + TASK_OVERHEAD
    )


def inject(frames: int, frame: Frame, psf_pixels: int) -> int:
    """Companions added to ``frames`` integrations: the integrations in, the output, the
    companions' image (float64, then float32) and a PSF box's Fourier shift (the box, its
    spectra and ramps, a few float64 and complex copies of ``psf_pixels``)."""
    return 8 * frames * frame.pixels + 12 * frame.pixels + 80 * psf_pixels + TASK_OVERHEAD


def inject_klip(frames: int, npsf: int, rows: int, frame: Frame, zones: int | None) -> int:
    """A KLIP task of an injected set's own bases (ADI, ``science.injection``): its
    targets' aligned references whole (read back from disk, plus the moved companions, and
    their sum: float32) and what a Gram task holds (``test_memory`` measures them as one
    task, every reference ADI: the most)."""
    whole = 3 * 4 * frames * npsf * frame.pixels
    return whole + klip_gram(frames, npsf, rows, frame, True, zones)


def write(nbytes: int, run: int | None = None, buffered: bool = True) -> int:
    """Write a block of ``nbytes`` whose longest run contiguous in the file is ``run``
    bytes (default: the whole block): the block and its big-endian copy, made a run at a
    time and WRITE_BUFFER bytes at most into a FITS file (``buffered``), whole for a Zarr
    chunk (its encoder copies the whole chunk)."""
    copy = min(run or nbytes, WRITE_BUFFER) if buffered else nbytes
    return nbytes + copy + TASK_OVERHEAD


def companion_adi(
    targets: int,
    npsf: int,
    pixels: int,
    rectangles: int,
    zones: int,
    touched: int,
    bordered: bool,
) -> int:
    """What an ADI companion's negative injection needs of one exposure
    (``steps.negative_injection``'s task), for ``targets`` bases (1 with
    ``align_to="first"``, else the integrations) of ``npsf`` references: their frames on
    the windows' ``rectangles`` pixels (float32) and their means over the ``zones``; the
    targets there (float64 at most); the Gram matrices (``bordered``: with the overlaps),
    overlaps and choice of the ``touched`` zones; the references centred on U's ``pixels``
    (float64) with a gathered and a subtracted copy of the same size; the target on U."""
    b = targets
    frames = 4 * b * npsf * rectangles + 8 * b * npsf * zones + 8 * b * (rectangles + zones)
    kept = b * touched * npsf * (8 * (npsf + bordered) + 8 + 1)
    work = 3 * 8 * b * npsf * pixels + 8 * b * pixels
    return frames + kept + work + TASK_OVERHEAD
