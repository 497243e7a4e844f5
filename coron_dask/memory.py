"""What each kind of task needs in memory, as a function of its block: the model the block
planner (``chunking``) sizes blocks with, checked against peaks measured on a worker
(tests/test_memory.py).

A task's peak is everything that must be in memory while it runs: its inputs, its output
and its working set, in bytes. The working sets follow the block functions in
``kernels.blocks``, which keep their temporaries to a frame or a batch of frames. A worker
also holds what waits between tasks (``held``, ``waiting``) on top of its own baseline.
"""

from dataclasses import dataclass

from coron_dask.kernels.median_fill import FILL_BATCH
from coron_dask.kernels.registration import BATCH_PIXELS

MIB = 2**20
#: Python, numpy and file objects a task touches besides its arrays.
TASK_OVERHEAD = 2 * MIB
#: Reduction fan-in of the Gram matrix and i2d sums (``steps.klip.SPLIT_EVERY`` uses it).
SPLIT_EVERY = 4


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


def fft_batch(frame: Frame) -> int:
    """Frames the shift fit and the shift transform at once (``kernels.registration``)."""
    return int(min(16, max(1, BATCH_PIXELS // frame.pixels)))


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
    """Median fill of ``frames`` frames: image, SCI and DQ in, the output, per frame the bad
    mask, a padded float64 copy and a batch of windows."""
    pad = (frame.ny + box) * (frame.nx + box) * 8
    windows = 4 * FILL_BATCH * (box + 1) ** 2 * 8
    return 16 * frames * frame.pixels + 24 * frame.pixels + pad + windows + TASK_OVERHEAD


def fit(frames: int, psfs: int, frame: Frame) -> int:
    """Shift fit of ``psfs`` references to ``frames`` science frames: both in (float32), the
    PSFMASK, the science frame's spectra and model energy, and a batch of references in
    flight (float64 frames, their spectra, the model and its derivatives)."""
    batch = min(psfs, fft_batch(frame))
    per_batch = batch * (11 * 8 * frame.pixels + 4 * frame.spectrum)
    problem = 4 * 8 * frame.pixels + 4 * frame.spectrum
    return 4 * (frames + psfs) * frame.pixels + 8 * frame.pixels + problem + per_batch


def shift(frames: int, psfs: int, frame: Frame) -> int:
    """Fourier shift of ``psfs`` references to ``frames`` targets: references in (float32),
    the output (float32), a batch of float64 frames, their spectra and the shifted ones."""
    batch = min(psfs, fft_batch(frame))
    per_batch = batch * (2 * 8 * frame.pixels + 4 * frame.spectrum)
    return 4 * psfs * frame.pixels * (1 + frames) + per_batch + TASK_OVERHEAD


def klip_tile(frames: int, npsf: int, rows: int, frame: Frame) -> int:
    """A KLIP tile of ``npsf`` references × ``rows`` rows for ``frames`` targets, made by
    the rechunk: the tile and the pieces it is made of."""
    return 2 * 4 * frames * npsf * rows * frame.nx + TASK_OVERHEAD


def klip_gram(frames: int, npsf: int, rows: int, frame: Frame) -> int:
    """Gram matrices on a tile: the tile, one float64 centred copy, the matrices."""
    tile = rows * frame.nx
    return 4 * frames * npsf * tile + 8 * npsf * tile + 8 * (frames + 1) * npsf**2 + TASK_OVERHEAD


def klip_sum(frames: int, npsf: int) -> int:
    """A step of the Gram matrices' tree sum: its inputs and the sum."""
    return 8 * frames * npsf**2 * (SPLIT_EVERY + 1) + TASK_OVERHEAD


def klip_weights(frames: int, npsf: int, truncate: int) -> int:
    """Eigen-decompositions of the Gram matrices: the matrices, LAPACK's work, the weights."""
    count = min(truncate, npsf)
    return 8 * frames * npsf**2 + 6 * 8 * npsf**2 + 16 * frames * npsf * count + TASK_OVERHEAD


def klip_images(frames: int, npsf: int, rows: int, frame: Frame, truncate: int) -> int:
    """KL images and ERR on a tile: the tile, the weights, two float64 copies of the tile
    (one target at a time), the output."""
    count = min(truncate, npsf)
    tile = rows * frame.nx
    return (
        4 * frames * npsf * tile
        + 16 * frames * npsf * count
        + 16 * npsf * tile
        + 16 * count * tile
        + 8 * frames * (count + 1) * tile
        + TASK_OVERHEAD
    )


def klip_subtract(frames: int, frame: Frame, truncate: int, npsf: int, shared: bool) -> int:
    """Subtraction for ``frames`` targets: the targets, the KL images (shared by all, or one
    set per target), float64 copies of one target (all of them with a shared basis)."""
    count = min(truncate, npsf)
    images = count if shared else frames * count
    copies = frames if shared else 1
    return (
        4 * frames * frame.pixels
        + 8 * images * frame.pixels
        + 4 * 8 * copies * frame.pixels
        + 4 * frames * frame.pixels
        + TASK_OVERHEAD
    )


def resample(frames: int, frame: Frame, grid_pixels: int) -> int:
    """Drizzle of ``frames`` integrations: SCI, ERR, DQ and the pixel map in, drizzle's
    output and weight images, the float64 block sum, per-frame weights and data."""
    return (
        12 * frames * frame.pixels
        + 16 * frame.pixels
        + 40 * frame.pixels
        + 32 * grid_pixels
        + TASK_OVERHEAD
    )


def write(nbytes: int, unsigned: bool = False) -> int:
    """Write a block of ``nbytes``: the block and its big-endian copy (and the offset one
    of unsigned integers)."""
    return nbytes * (3 if unsigned else 2) + TASK_OVERHEAD
