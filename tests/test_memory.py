"""The memory model against measurements: every kind of task runs its block function on a
Dask worker (a process with the environment the pipeline's LocalCluster gives its workers),
and its measured peak must lie between the model's prediction / 1.5 and the prediction.

The measured peak of a task is the bytes of its inputs (in a real run they exist before the
task does) plus the rise of the worker's resident memory during the call: the peak resident
size (VmHWM, reset just before the call) minus the resident size before it, measured after
garbage collection and with the free heap memory given back, so that no memory freed by an
earlier call hides the task's own. Each task runs twice and the second call is the one
measured: the first loads what a worker loads once (drizzle, FFT plans, BLAS buffers),
which is part of the worker's baseline, not of a task.

Not measured: writes into Zarr stores, whose encoder copies a whole chunk, as
``memory.write`` counts them (unbuffered).
"""

import ctypes
import gc
import os
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from coron_dask.core.dqflags import PIXEL
from coron_dask.io.fitsfile import FitsExtension, FitsRegion
from coron_dask.io.staging import write_block
from coron_dask.kernels import blocks as kernels
from coron_dask.kernels import inject as kernels_inject
from coron_dask.kernels.drizzle import drizzle_block
from coron_dask.kernels.zones import zone_map
from coron_dask.planning import memory
from coron_dask.planning.block_plan import (
    Observation,
    Workers,
    held,
    plan_blocks,
    task_peaks,
    waiting,
)
from coron_dask.planning.memory import MIB, Frame
from coron_dask.steps import blocks as tasks
from coron_dask.steps import klip_blocks, selection_blocks
from coron_dask.steps.forward_model import windows_block
from coron_dask.steps.negative_injection import window_block, window_pixels

#: The model's arrays (its peak less the fixed allowance every task has, TASK_OVERHEAD,
#: which covers what a worker's heap adds: 0.3 to 1.3 MiB) may overestimate a measured
#: peak by at most this factor. The allowance is not looseness: a 4 MiB task measured
#: 3.7 to 4.3 MiB on different runs.
LOOSENESS = 1.5
DO_NOT_USE = PIXEL["DO_NOT_USE"]
OUTLIER_BITS = PIXEL["DO_NOT_USE"] | PIXEL["OUTLIER"]
MEDIAN_BAD_BITS = DO_NOT_USE  # outlier_detection's, from its good bits ~DO_NOT_USE
KL_CUBE = (5, 10, 20, 50)  # a KL-mode cube's cutoffs
TRUNCATE = 50
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter
GIB = 2**30
MIRI = (8, 216, 16, 212)  # MIRI's 4QPM field (y0, y1, x0, x1): beyond it NON_SCIENCE
ZONES = (5, 4)  # KLIP in 5 annuli × 4 subsections


@dataclass(frozen=True)
class Case:
    """One task: its kind and its block (the builder's and the model's arguments)."""

    kind: str
    block: dict

    def __str__(self) -> str:
        block = ",".join(f"{k}={v}".replace(" ", "") for k, v in self.block.items())
        return f"{self.kind}[{block}]"


# Blocks of the sizes the planner makes (a few MB and more): small and large frames, few
# and many frames, references or integrations; a read of every integration of some rows
# (a median slab); KLIP tiles of about 16 MiB of references (``chunking.tile_rows``) in
# ``splits`` reference blocks; ``bad``: the fraction of bad pixels (a few, or so many that
# the fill works in full batches); ``field``: MIRI's, NON_SCIENCE beyond it.
CASES = [
    Case("read", dict(block=(60, 160, 160), file=(65, 160, 160), start=3, dtype="float32")),
    Case("read", dict(block=(50, 224, 288), file=(60, 224, 288), start=5, dtype="uint32")),
    Case("read", dict(block=(100, 64, 288), file=(100, 224, 288), start=80, dtype="float32")),
    Case("outlier_median", dict(nints=50, rows=64, nx=160)),
    Case("outlier_median", dict(nints=100, rows=64, nx=288)),
    Case("outlier_flag", dict(frames=20, ny=160, nx=160, which="sci")),
    Case("outlier_flag", dict(frames=40, ny=224, nx=288, which="dq")),
    Case("fill", dict(frames=150, ny=160, nx=160, image="sci", bad=0.01, box=3)),
    Case("fill", dict(frames=20, ny=224, nx=288, image="err", bad=0.01, box=3)),
    Case("fill", dict(frames=30, ny=224, nx=288, image="sci", bad=0.15, box=3)),
    Case("fill", dict(frames=30, ny=224, nx=288, image="err", bad=0.15, box=5)),
    Case("fill", dict(frames=20, ny=224, nx=288, image="err", bad=0.003, box=3, field=MIRI)),
    Case("fit", dict(frames=1, psfs=40, ny=64, nx=64)),
    Case("fit", dict(frames=2, psfs=20, ny=160, nx=160)),
    Case("fit", dict(frames=1, psfs=10, ny=224, nx=288)),
    Case("shift", dict(frames=4, psfs=64, ny=64, nx=64)),
    Case("shift", dict(frames=1, psfs=20, ny=160, nx=160)),
    Case("shift", dict(frames=3, psfs=10, ny=224, nx=288)),
    Case("shift", dict(frames=4, psfs=64, ny=64, nx=64, zones=ZONES)),
    Case("shift", dict(frames=1, psfs=40, ny=160, nx=160, zones=ZONES)),
    Case("klip_gram", dict(frames=1, npsf=100, rows=160, ny=160, nx=160)),
    Case("klip_gram", dict(frames=4, npsf=220, rows=66, ny=224, nx=288)),
    Case("klip_gram", dict(frames=10, npsf=48, rows=160, ny=160, nx=160, own=True)),
    Case("klip_gram", dict(frames=4, npsf=220, rows=66, ny=224, nx=288, own=True)),
    Case("klip_gram", dict(frames=1, npsf=100, rows=160, ny=160, nx=160, zones=ZONES)),
    Case("klip_gram", dict(frames=4, npsf=220, rows=66, ny=224, nx=288, own=True, zones=ZONES)),
    Case("klip_weights", dict(frames=8, npsf=300)),
    Case("klip_weights", dict(frames=2, npsf=800)),
    Case("klip_weights", dict(frames=4, npsf=300, zones=ZONES)),
    Case("klip_norms", dict(frames=4, npsf=400, rows=36, ny=224, nx=288, shared=False)),
    Case("klip_norms", dict(frames=4, npsf=400, rows=36, ny=224, nx=288, shared=True, zones=ZONES)),
    Case("klip_chosen_gram", dict(frames=2, npsf=1000, kept=50, rows=13, ny=160, nx=160)),
    Case(
        "klip_chosen_gram",
        dict(frames=2, npsf=1000, kept=200, rows=13, ny=160, nx=160, zones=ZONES),
    ),
    Case("klip_chosen_weights", dict(frames=4, npsf=2000, kept=300)),
    Case("klip_chosen_weights", dict(frames=2, npsf=2000, kept=400, zones=ZONES)),
    Case("klip_errors", dict(frames=2, npsf=100, rows=160, ny=160, nx=160)),
    Case("klip_errors", dict(frames=4, npsf=220, rows=66, ny=224, nx=288)),
    Case("klip_errors", dict(frames=4, npsf=220, rows=66, ny=224, nx=288, cutoffs=KL_CUBE)),
    Case(
        "klip_errors",
        dict(frames=4, npsf=220, rows=66, ny=224, nx=288, cutoffs=KL_CUBE, zones=ZONES),
    ),
    Case("klip_overlaps", dict(frames=10, npsf=100, rows=160, ny=160, nx=160, shared=True)),
    Case("klip_overlaps", dict(frames=4, npsf=200, rows=66, ny=224, nx=288, shared=False)),
    Case(
        "klip_overlaps",
        dict(frames=10, npsf=100, rows=160, ny=160, nx=160, shared=True, zones=ZONES),
    ),
    Case("klip_subtract", dict(frames=10, npsf=100, rows=160, ny=160, nx=160, shared=True)),
    Case("klip_subtract", dict(frames=4, npsf=200, rows=66, ny=224, nx=288, shared=False)),
    Case(
        "klip_subtract",
        dict(frames=10, npsf=100, rows=160, ny=160, nx=160, shared=True, cutoffs=KL_CUBE),
    ),
    Case(
        "klip_subtract",
        dict(frames=4, npsf=200, rows=66, ny=224, nx=288, shared=False, cutoffs=KL_CUBE),
    ),
    Case(
        "klip_subtract",
        dict(
            frames=4,
            npsf=200,
            rows=66,
            ny=224,
            nx=288,
            shared=False,
            cutoffs=KL_CUBE,
            zones=ZONES,
        ),
    ),
    Case("inject", dict(frames=60, ny=160, nx=160, box=65)),
    Case("companion_windows", dict(frames=10, npsf=100, ny=160, nx=160, window=61, shared=True)),
    Case("companion_windows", dict(frames=4, npsf=200, ny=224, nx=288, window=45, windows=3)),
    Case(
        "companion_windows",
        dict(frames=4, npsf=200, ny=224, nx=288, window=45, windows=2, zones=ZONES),
    ),
    Case("companion_adi", dict(targets=1, npsf=270, ny=320, nx=320, window=45, rolls=2)),
    Case(
        "companion_adi",
        dict(targets=8, npsf=120, ny=224, nx=288, window=41, rolls=3, zones=ZONES),
    ),
    Case("inject_klip", dict(frames=4, npsf=60, rows=160, ny=160, nx=160)),
    Case("inject_klip", dict(frames=2, npsf=100, rows=66, ny=224, nx=288, zones=ZONES)),
    Case("inject", dict(frames=30, ny=224, nx=288, box=161)),
    Case("resample", dict(frames=30, ny=160, nx=160)),
    Case("resample", dict(frames=20, ny=224, nx=288)),
    Case("resample", dict(frames=20, ny=224, nx=288, planes=4)),
    Case("write", dict(block=(20, 224, 288), file=(30, 224, 288), dtype="float32")),
    Case("write", dict(block=(20, 224, 288), file=(30, 224, 288), dtype="uint32")),
    Case("write", dict(block=(4, 10, 160, 160), file=(6, 10, 160, 160), dtype="float32")),
    # larger than the write buffer: the block and one buffer's copy
    Case("write", dict(block=(6, 40, 160, 160), file=(9, 40, 160, 160), dtype="float32")),
    Case("write", dict(block=(3, 5, 320, 320), file=(9, 12, 320, 320), dtype="float32")),
]


# --- measuring, on the worker ---------------------------------------------------------------


def _status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) * 1024
    return values


def _settle() -> int:
    """Free what can be freed, give free heap memory back, reset the peak: the resident size.

    ``malloc_trim`` gives back the free pages inside the heaps, but not the free top of a
    thread's arena (dask runs tasks on threads), which glibc trims only on a free and only
    beyond MALLOC_TRIM_THRESHOLD_ (32 MiB on the workers): the threshold goes to 0 for one
    large free, and back.
    """
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(M_TRIM_THRESHOLD, 0)
    libc.free(libc.malloc(2**20))
    libc.mallopt(M_TRIM_THRESHOLD, int(os.environ.get("MALLOC_TRIM_THRESHOLD_", 2**17)))
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    return _status()["VmRSS"]


def measure(case: Case, path: str | None = None, repeat: int = 2) -> int:
    """Build the inputs of ``case`` here, run its task ``repeat`` times and return the peak
    of the last run: its inputs' bytes plus the rise of the resident size during the call."""
    task, arrays = BUILD[case.kind](np.random.default_rng(7), path, **case.block)
    inputs = sum({id(a): a.nbytes for a in arrays}.values())  # an array given twice counts once
    for _ in range(repeat):
        before = _settle()
        result = task()
        rise = _status()["VmHWM"] - before
        del result
    return inputs + rise


# --- realistic inputs -----------------------------------------------------------------------


def _psf(ny: int, nx: int, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """A smooth coronagraphic-looking PSF (a core, a ring, a halo) centred + (dx, dy)."""
    y, x = np.indices((ny, nx), dtype=np.float64)
    radius = np.hypot(x - nx / 2 - dx, y - ny / 2 - dy)
    core = np.exp(-0.5 * (radius / 2.5) ** 2)
    ring = 0.2 * np.exp(-0.5 * ((radius - ny / 8) / 2.0) ** 2)
    halo = 0.05 * np.exp(-0.5 * (radius / (ny / 5)) ** 2)
    return 1000.0 * (core + ring + halo)


def _frames(rng, count: int, ny: int, nx: int, jitter: float = 0.0) -> np.ndarray:
    """``count`` float32 PSF frames, each moved by up to ``jitter`` pixels, scaled, noisy."""
    out = np.empty((count, ny, nx), dtype=np.float32)
    for i in range(count):
        dx, dy = rng.uniform(-jitter, jitter, 2)
        out[i] = rng.uniform(0.8, 1.2) * _psf(ny, nx, dx, dy) + rng.normal(0, 1.0, (ny, nx))
    return out


def _exposure(rng, count: int, ny: int, nx: int, bad: float = 0.01) -> tuple[np.ndarray, ...]:
    """SCI, ERR, DQ of ``count`` integrations: a ``bad`` fraction of pixels flagged
    DO_NOT_USE, a few NaN and a few outliers."""
    sci = _frames(rng, count, ny, nx, jitter=0.3)
    err = np.float32(1.0) + np.sqrt(np.abs(sci)) / np.float32(30)
    dq = np.zeros(sci.shape, dtype=np.uint32)
    size = sci.size
    dq.flat[rng.choice(size, int(size * bad), replace=False)] = DO_NOT_USE
    sci.flat[rng.choice(size, size // 500, replace=False)] = np.nan
    sci.flat[rng.choice(size, size // 500, replace=False)] += 5000.0
    return sci, err, dq


def build_read(rng, path, block, file, start, dtype):
    name, offset = path
    proxy = FitsExtension(Path(name), offset, file, np.dtype(dtype))
    key = tuple(
        slice(start, start + n) if n < m else slice(None) for n, m in zip(block, file, strict=True)
    )
    return (lambda: proxy[key]), []


def build_outlier_median(rng, path, nints, rows, nx):
    sci, _, dq = _exposure(rng, nints, rows, nx)
    return (lambda: kernels.median_block(sci, dq, MEDIAN_BAD_BITS, 0.7)), [sci, dq]


def build_outlier_flag(rng, path, frames, ny, nx, which):
    sci, err, dq = _exposure(rng, frames, ny, nx)
    median = np.nanmedian(sci, axis=0).astype(np.float32)

    def task():
        return kernels.flag_block(which, sci, err, dq, median, 5.0, OUTLIER_BITS, DO_NOT_USE)

    return task, [sci, err, dq, median]


def build_fill(rng, path, frames, ny, nx, image, bad, box, field=None):
    sci, err, dq = _exposure(rng, frames, ny, nx, bad)
    non_science = None
    if field is not None:  # MIRI: pixels beyond the field become 0, not filled
        y0, y1, x0, x1 = field
        outside = np.ones((ny, nx), dtype=bool)
        outside[y0:y1, x0:x1] = False
        dq[:, outside] |= DO_NOT_USE | PIXEL["NON_SCIENCE"]
        non_science = PIXEL["NON_SCIENCE"]
    data = sci if image == "sci" else err  # align_refs fills SCI and ERR, each with SCI, DQ

    def task():
        return kernels.fill_block(data, sci, dq, box, DO_NOT_USE, non_science)

    return task, [data, sci, dq]


def _on_disk(folder: str, name: str, data: np.ndarray) -> FitsExtension:
    """``data`` written to a file in ``folder`` as the pipeline keeps arrays on disk (a
    big-endian FITS data area, here at offset 0): what reads it back, as
    ``staging.reader`` does (in the file's byte order)."""
    path = Path(folder) / f"{name}.raw"
    data.astype(data.dtype.newbyteorder(">")).tofile(path)
    return FitsExtension(path, 0, data.shape, data.dtype, native=False)


def build_fit(rng, path, frames, psfs, ny, nx):
    """As the pipeline runs it: the references' block read from disk by the task."""
    science = _frames(rng, frames, ny, nx)
    source = _on_disk(path[0], "refs", _frames(rng, 2 * psfs, ny, nx, jitter=1.0))
    indices = np.arange(psfs // 2, psfs // 2 + psfs)
    radius = np.hypot(*(np.indices((ny, nx)) - np.array([ny / 2, nx / 2])[:, None, None]))
    mask = np.where(radius > 3, 1.0, 0.0)  # a PSFMASK without the core, float64 as align_refs
    return (lambda: tasks.fit_block(science, indices, mask, source)), [science, mask]


def _zones(ny: int, nx: int, zones: tuple[int, int] | None):
    """KLIP's zones (annuli, subsections) about the frame's centre, inside an IWA of 3."""
    return (
        None if zones is None else zone_map((ny, nx), (nx / 2 - 0.3, ny / 2 + 0.2), *zones, iwa=3)
    )


def build_shift(rng, path, frames, psfs, ny, nx, zones=None):
    """As the pipeline runs it: the references read from disk, shifted, the result written
    into psfalign (a FITS file) and its frame means (or zone means) given back
    (``write_blocks``)."""
    source = _on_disk(path[0], "refs", _frames(rng, 2 * psfs, ny, nx, jitter=1.0))
    indices = np.arange(psfs, 2 * psfs)
    shifts = rng.uniform(-1, 1, (frames, psfs, 4))
    shifts[..., 3] = 1  # (dx, dy, β, converged), as fit_block gives them
    if frames == 1:  # align_to="first": (p, 3)
        shifts, shape, where = shifts[0], (2 * psfs, ny, nx), (slice(psfs, 2 * psfs),)
    else:
        shape = (frames + 1, 2 * psfs, ny, nx)
        where = (slice(1, frames + 1), slice(psfs, 2 * psfs))
    region = FitsRegion(Path(path[0]) / "psfalign.raw", 0, shape, np.float32)
    with open(region.path, "wb") as handle:
        handle.truncate(4 * prod(shape))
    where += (slice(None), slice(None))

    summary = klip_blocks.summary(_zones(ny, nx, zones))

    def task():
        return write_block(tasks.shift_block(indices, shifts, source), where, (region,), summary)

    return task, [shifts]


def _aligned_on_disk(rng, folder, frames, npsf, ny, nx, shared=False, zones=None):
    """Aligned references (frames + 1, npsf, ny, nx) on disk, as the pipeline writes them,
    or with ``shared`` one set (npsf, ny, nx) for all targets (``align_to="first"``); the
    means (over the frame, or each of the ``zones``) of those of the task's ``frames``
    targets, and the targets' indices."""
    refs = _frames(rng, npsf, ny, nx, jitter=0.05)
    means = klip_blocks.means_block(refs, zones)
    if shared:
        means = np.broadcast_to(means, (frames, *means.shape))  # as kl_basis hands them over
        return _on_disk(folder, "aligned", refs), [means], np.arange(frames)
    aligned = np.ascontiguousarray(np.broadcast_to(refs, (frames + 1, npsf, ny, nx)))
    means = np.ascontiguousarray(np.broadcast_to(means, (frames, *means.shape)))
    return _on_disk(folder, "aligned", aligned), [means], np.arange(1, frames + 1)


def build_klip_gram(rng, path, frames, npsf, rows, ny, nx, own=False, zones=None):
    """As the pipeline runs it: every tile read from disk by the task, in turn; with
    ``own``, bordered by the overlaps of the integrations (a basis per integration)."""
    zones = _zones(ny, nx, zones)
    source, means, indices = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, False, zones)
    targets = [_frames(rng, frames, ny, nx, jitter=0.3)] if own else []

    def task():
        bordered = [targets] if own else None
        return klip_blocks.gram_block(indices, means, bordered, rows, zones, source=source)

    return task, [*means, *targets]


def build_inject_klip(rng, path, frames, npsf, rows, ny, nx, zones=None):
    """An injected set's own bases (ADI), its tasks as one: the targets' aligned references
    read back from disk, the moved companions added (every reference ADI: the most), and
    the bordered Gram matrices of the sum, which the task is handed whole."""
    zones = _zones(ny, nx, zones)
    source, means, indices = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, False, zones)
    moved = _frames(rng, frames * npsf, ny, nx, jitter=0.3).reshape(frames, npsf, ny, nx)
    targets = _frames(rng, frames, ny, nx, jitter=0.3)

    def task():
        read = np.asarray(source[int(indices[0]) : int(indices[-1]) + 1], dtype=np.float32)
        return klip_blocks.gram_block(read + moved, means, [targets], rows, zones)

    return task, [*means, moved, targets]


def build_klip_weights(rng, path, frames, npsf, zones=None):
    """Bordered Gram matrices (frames, Z, npsf, npsf + 1), as a basis per integration has."""
    count = 1 if zones is None else zones[0] * zones[1]
    grams = np.empty((frames, count, npsf, npsf + 1))
    for gram in grams.reshape(-1, npsf, npsf + 1):
        basis = rng.normal(size=(npsf, 2 * npsf))
        np.matmul(basis, basis.T, out=gram[:, :npsf])
    return (lambda: klip_blocks.weights_block(grams, 160 * 160, TRUNCATE)), [grams]


def build_klip_norms(rng, path, frames, npsf, rows, ny, nx, shared, zones=None):
    """As the pipeline runs it: each tile read from disk, the norms and overlaps summed."""
    zones = _zones(ny, nx, zones)
    source, means, indices = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, shared, zones)
    targets = _frames(rng, frames, ny, nx, jitter=0.3)

    def task():
        return selection_blocks.norms_block(indices, means, [[targets]], rows, zones, source)

    return task, [targets, *means]


def _chosen(rng, frames, npsf, kept, count) -> np.ndarray:
    """Indices (frames, Z, kept) of references chosen, ascending, as the choice gives them."""
    picks = [np.sort(rng.choice(npsf, kept, replace=False)) for _ in range(frames * count)]
    return np.array(picks).reshape(frames, count, kept)


def build_klip_chosen_gram(rng, path, frames, npsf, kept, rows, ny, nx, zones=None):
    """As the pipeline runs it: every tile read from disk, the chosen rows' products."""
    zones = _zones(ny, nx, zones)
    source, means, indices = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, False, zones)
    chosen = _chosen(rng, frames, npsf, kept, 1 if zones is None else zones.count)

    def task():
        return selection_blocks.chosen_gram_block(indices, means, [chosen], rows, zones, source)

    return task, [*means, chosen]


def build_klip_chosen_weights(rng, path, frames, npsf, kept, zones=None):
    """Gram matrices (frames, Z, kept, kept) of chosen references, spread over npsf."""
    count = 1 if zones is None else zones[0] * zones[1]
    grams = np.empty((frames, count, kept, kept))
    for gram in grams.reshape(-1, kept, kept):
        basis = rng.normal(size=(kept, 2 * kept))
        np.matmul(basis, basis.T, out=gram)
    chosen = _chosen(rng, frames, npsf, kept, count)

    def task():
        return selection_blocks.chosen_weights_block(grams, chosen, npsf, 160 * 160, TRUNCATE)

    return task, [grams, chosen]


def _weights(rng, frames, npsf, count, ny, nx, shared, zones=None):
    """KL weights (frames, Z, 2, npsf, count), one set broadcast to every target if
    ``shared``."""
    sets = (1 if shared else frames, 1 if zones is None else zones.count)
    weights = rng.normal(size=(*sets, 2, npsf, count)) / np.sqrt(ny * nx)
    return np.broadcast_to(weights, (frames, *weights.shape[1:])) if shared else weights


def build_klip_errors(rng, path, frames, npsf, rows, ny, nx, cutoffs=(TRUNCATE,), zones=None):
    """As the pipeline runs it: every tile read from disk by the task, in turn."""
    zones = _zones(ny, nx, zones)
    source, means, targets = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, False, zones)
    weights = _weights(rng, frames, npsf, min(cutoffs[-1], npsf), ny, nx, False, zones)
    kept = tuple(min(k, npsf) for k in cutoffs)

    def task():
        return klip_blocks.errors_block(
            targets, means, [[[weights]]], rows, kept, zones, source=source
        )

    return task, [*means, weights]


def build_klip_overlaps(rng, path, frames, npsf, rows, ny, nx, shared, zones=None):
    zones = _zones(ny, nx, zones)
    source, means, indices = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, shared, zones)
    targets = _frames(rng, frames, ny, nx, jitter=0.3)

    def task():
        return klip_blocks.overlaps_block([[targets]], indices, means, rows, zones, source=source)

    return task, [targets, *means]


def build_klip_subtract(
    rng, path, frames, npsf, rows, ny, nx, shared, cutoffs=(TRUNCATE,), zones=None
):
    zones = _zones(ny, nx, zones)
    source, means, indices = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, shared, zones)
    targets = _frames(rng, frames, ny, nx, jitter=0.3)
    weights = _weights(rng, frames, npsf, min(cutoffs[-1], npsf), ny, nx, shared, zones)
    overlaps = rng.normal(size=(frames, weights.shape[1], npsf))
    kept = tuple(min(k, npsf) for k in cutoffs)

    def task():
        return klip_blocks.project_block(
            targets, indices, means, [[[weights]]], [overlaps], rows, kept, zones, source=source
        )

    return task, [targets, *means, weights[: 1 if shared else frames], overlaps]


def build_companion_windows(
    rng, path, frames, npsf, ny, nx, window, windows=1, shared=False, zones=None
):
    """As the pipeline runs it: each window's rows read from disk by the task."""
    zones = _zones(ny, nx, zones)
    source, means, indices = _aligned_on_disk(rng, path[0], frames, npsf, ny, nx, shared, zones)
    weights = _weights(rng, frames, npsf, TRUNCATE, ny, nx, shared, zones)
    corners = rng.integers(0, min(ny, nx) - window, (windows, 2))
    frame, shape = (ny, nx), (window, window)

    def task():
        return windows_block(indices, means, [[weights]], corners, shape, frame, zones, source)

    return task, [*means, weights[: 1 if shared else frames]]


def _adi_pixels(rng, ny, nx, window, rolls, zones):
    """U of a companion: its window and one per other roll, a few pixels apart."""
    labels = None if zones is None else zones.labels
    y0, x0 = rng.integers(0, min(ny, nx) - window - 12, 2)
    corners = [(int(y0 + 5 * r), int(x0 + 3 * r)) for r in range(rolls)]
    return window_pixels(corners, [(window, window)] * rolls, (ny, nx), labels)


def build_companion_adi(rng, path, targets, npsf, ny, nx, window, rolls, zones=None):
    """As ``steps.negative_injection`` runs it: the references' and targets' rectangles
    and the touched zones' Gram matrices handed over (float32 frames, float64 sums)."""
    zones = _zones(ny, nx, zones)
    pixels = _adi_pixels(rng, ny, nx, window, rolls, zones)
    count = 1 if zones is None else zones.count
    touched = np.unique(pixels.labels[pixels.labels >= 0])
    shapes = [(y1 - y0, x1 - x0) for y0, y1, x0, x1 in pixels.rectangles]
    refs = [rng.normal(size=(targets, npsf, *shape)).astype(np.float32) for shape in shapes]
    means = rng.normal(size=(targets, npsf, count))
    frames = [rng.normal(size=(targets, *shape)) for shape in shapes]
    target_means = rng.normal(size=(targets, count))
    gram = rng.normal(size=(targets, len(touched), npsf, npsf))
    overlaps = rng.normal(size=(targets, len(touched), npsf))
    chosen = rng.random((targets, len(touched), npsf)) > 0.2

    def task():
        return window_block(refs, means, frames, target_means, gram, overlaps, chosen, pixels, nx)

    return task, [*refs, means, *frames, target_means, gram, overlaps, chosen]


def build_inject(rng, path, frames, ny, nx, box):
    """Ten companions of a ``box``-sided PSF added to every integration."""
    sci = _frames(rng, frames, ny, nx)
    psf = _psf(box, box, 0.0, 0.0)
    positions = rng.uniform(10, min(ny, nx) - 10, (10, 2))
    fluxes = np.full(10, 1e-3)
    return (lambda: kernels_inject.inject_block(sci, positions, fluxes, psf, False)), [sci, psf]


def resample_grid(ny: int, nx: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A pixel map (ny, nx, 2) of frames rotated by 30° and the output grid that holds them."""
    y, x = np.indices((ny, nx), dtype=np.float64)
    angle = np.radians(30)
    gx = np.cos(angle) * x - np.sin(angle) * y
    gy = np.sin(angle) * x + np.cos(angle) * y
    gx -= gx.min() - 1
    gy -= gy.min() - 1
    shape = (int(np.ceil(gy.max())) + 2, int(np.ceil(gx.max())) + 2)
    return np.dstack([gx, gy]), shape


def build_resample(rng, path, frames, ny, nx, planes=1):
    sci, err, dq = _exposure(rng, frames, ny, nx)
    images = np.stack([sci] * planes)  # a KL-mode cube's planes
    pixmap, shape = resample_grid(ny, nx)

    variance = err**2 / 2

    def task():
        return drizzle_block(images, err, variance, dq, pixmap, shape, DO_NOT_USE)

    return task, [images, err, variance, dq, pixmap]


def build_write(rng, path, block, file, dtype):
    name, offset = path
    region = FitsRegion(Path(name), offset, file, np.dtype(dtype))
    if dtype == "uint32":
        data = rng.integers(0, 2**32, block, dtype=np.uint32)
    else:
        data = _frames(rng, prod(block[:-2]), *block[-2:]).reshape(block)
    key = tuple(slice(1, 1 + n) if n < m else slice(None) for n, m in zip(block, file, strict=True))
    return (lambda: region.__setitem__(key, data)), [data]


# tasks that read from disk
ON_DISK = (
    "fit",
    "shift",
    "klip_gram",
    "klip_errors",
    "klip_overlaps",
    "klip_subtract",
    "inject_klip",
    "klip_norms",
    "klip_chosen_gram",
    "companion_windows",
)
BUILD = {
    "read": build_read,
    "outlier_median": build_outlier_median,
    "outlier_flag": build_outlier_flag,
    "fill": build_fill,
    "fit": build_fit,
    "shift": build_shift,
    "klip_gram": build_klip_gram,
    "klip_weights": build_klip_weights,
    "klip_norms": build_klip_norms,
    "klip_chosen_gram": build_klip_chosen_gram,
    "klip_chosen_weights": build_klip_chosen_weights,
    "klip_errors": build_klip_errors,
    "klip_overlaps": build_klip_overlaps,
    "klip_subtract": build_klip_subtract,
    "inject": build_inject,
    "companion_windows": build_companion_windows,
    "companion_adi": build_companion_adi,
    "inject_klip": build_inject_klip,
    "resample": build_resample,
    "write": build_write,
}


# --- the model's prediction -----------------------------------------------------------------


def predict(case: Case) -> int:
    """The model's peak for ``case``, called as the planner calls it."""
    b = case.block
    frame = Frame(b["ny"], b["nx"]) if "ny" in b else None
    zones = b["zones"][0] * b["zones"][1] if "zones" in b else None
    match case.kind:
        case "read":
            itemsize = np.dtype(b["dtype"]).itemsize
            return memory.read(b["block"][0], prod(b["block"][1:]), itemsize)
        case "outlier_median":
            return memory.outlier_median(b["nints"], b["rows"], b["nx"])
        case "outlier_flag":
            return memory.outlier_flag(b["frames"], frame)
        case "fill":
            return memory.fill(b["frames"], frame, b["box"])
        case "fit":
            return memory.fit(b["frames"], b["psfs"], frame)
        case "shift":  # its block written into a FITS file by the task
            return memory.shift(b["frames"], b["psfs"], frame, False, zones)
        case "klip_gram":
            own = b.get("own", False)
            return memory.klip_gram(b["frames"], b["npsf"], b["rows"], frame, own, zones)
        case "klip_weights":
            return memory.klip_weights(b["frames"], b["npsf"], min(TRUNCATE, b["npsf"]), zones)
        case "klip_norms":
            args = (b["frames"], b["npsf"], b["rows"], frame, b["shared"], zones)
            return memory.klip_norms(*args)
        case "klip_chosen_gram":
            args = (b["frames"], b["npsf"], b["kept"], b["rows"], frame, False, zones)
            return memory.klip_chosen_gram(*args)
        case "klip_chosen_weights":
            count = min(TRUNCATE, b["npsf"])
            return memory.klip_chosen_weights(b["frames"], b["npsf"], b["kept"], count, zones)
        case "klip_errors" | "klip_subtract":
            cutoffs = b.get("cutoffs", (TRUNCATE,))
            count, planes = min(cutoffs[-1], b["npsf"]), len(cutoffs)
            if case.kind == "klip_errors":
                below = max((k for k in cutoffs if k < b["npsf"]), default=0)
                args = (b["frames"], b["npsf"], b["rows"], frame, below, planes, zones)
                return memory.klip_errors(*args)
            args = (b["frames"], b["npsf"], b["rows"], frame, count, b["shared"], planes, zones)
            return memory.klip_project(*args)
        case "klip_overlaps":
            args = (b["frames"], b["npsf"], b["rows"], frame, b["shared"], zones)
            return memory.klip_overlaps(*args)
        case "inject":
            return memory.inject(b["frames"], frame, b["box"] ** 2)
        case "companion_windows":
            window = (b["window"], b["window"])
            args = (b["frames"], b["npsf"], TRUNCATE, window, frame, b.get("windows", 1))
            return memory.companion_windows(*args, zones)
        case "companion_adi":
            pixels = _adi_pixels(
                np.random.default_rng(7), b["ny"], b["nx"], b["window"], b["rolls"],
                _zones(b["ny"], b["nx"], b.get("zones")),
            )  # fmt: skip
            rectangles = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in pixels.rectangles)
            touched = len(np.unique(pixels.labels[pixels.labels >= 0]))
            args = (b["targets"], b["npsf"], len(pixels.flat), rectangles, zones or 1, touched)
            return memory.companion_adi(*args, bordered=False)
        case "inject_klip":
            return memory.inject_klip(b["frames"], b["npsf"], b["rows"], frame, zones)
        case "resample":
            _, shape = resample_grid(b["ny"], b["nx"])
            return memory.resample(b["frames"], frame, shape[0] * shape[1], b.get("planes", 1))
        case "write":
            itemsize = np.dtype(b["dtype"]).itemsize
            block, file = b["block"], b["file"]
            whole = next(i for i in range(len(block) + 1) if block[i:] == file[i:])
            run = itemsize * prod(block[max(whole - 1, 0) :])  # contiguous in the file
            return memory.write(itemsize * prod(block), run)
    raise ValueError(f"no model for {case.kind}")


# --- the test -------------------------------------------------------------------------------


def fits_file(path: Path, shape: tuple[int, ...], dtype: str, rng=None) -> tuple[str, int]:
    """A FITS file with one image extension of ``shape`` (random data with ``rng``, else
    zeros): its name and the offset of its data."""
    if rng is None:
        data = np.zeros(shape, dtype=dtype)
    elif dtype == "uint32":
        data = rng.integers(0, 2**32, shape, dtype=np.uint32)
    else:
        data = rng.normal(size=shape).astype(dtype)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, name="SCI")]).writeto(path)
    with fits.open(path) as hdul:
        return str(path), hdul["SCI"].fileinfo()["datLoc"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[str, int]]:
    """The files the read and write cases work on, by case: name and data offset."""
    folder = tmp_path_factory.mktemp("memory")
    rng = np.random.default_rng(3)
    return {
        str(case): fits_file(
            folder / f"{case.kind}{number}.fits",
            case.block["file"],
            case.block["dtype"],
            rng if case.kind == "read" else None,
        )
        for number, case in enumerate(CASES)
        if case.kind in ("read", "write")
    } | {  # a folder of its own for each case that keeps its data on disk
        str(case): (str(folder / f"{case.kind}{number}"), 0)
        for number, case in enumerate(CASES)
        if case.kind in ON_DISK and (folder / f"{case.kind}{number}").mkdir() is None
    }


@pytest.fixture(scope="module")
def client():
    """One worker process with one thread, started and set up as the pipeline's workers."""
    from coron_dask.runtime.deploy import Cluster, measure_workers

    with Cluster(
        n_workers=1,
        threads_per_worker=1,
        memory_limit="4GiB",
        dashboard_address="127.0.0.1:0",
        quiet=True,
    ) as cluster:
        measure_workers(cluster.client)
        yield cluster.client


@pytest.mark.parametrize("case", CASES, ids=str)
def test_model_bounds_measured_peak(case, client, files):
    measured = client.submit(measure, case, files.get(str(case)), pure=False).result()
    predicted = predict(case)
    shown = f"{case}: predicted {predicted / MIB:.2f} MiB, measured {measured / MIB:.2f} MiB"
    assert predicted >= measured, f"the model is below the measured peak: {shown}"
    arrays = predicted - memory.TASK_OVERHEAD
    assert arrays <= LOOSENESS * measured, (
        f"the model's arrays are loose by {arrays / measured:.2f}× (> {LOOSENESS}×): {shown}"
    )


def test_planned_companion_windows_stay_under_the_prediction_and_the_limit(client, tmp_path):
    """Twelve companions' windows of 61² (50 KL modes of 100 references on 160² frames) on
    1 GiB workers of two threads: the plan makes them in groups, since all twelve in one
    task would cross the plan's share of the limit; a companion-windows task of the
    plan's block (its integrations, its group of windows), run on a worker as the pipeline
    runs it, peaks under the plan's prediction, and a worker running one on each thread
    with what the plan has it hold stays under the share."""
    fraction, limit = 0.6, GIB
    sizes = dict(truncate=TRUNCATE, companions=12, window=(61, 61))
    obs = Observation((20, 20), (10,) * 10, (160, 160), **sizes)
    workers = Workers(1, 2, limit, 200 * MIB)
    plan = plan_blocks(obs, workers, fraction=fraction)
    k, p, rows = plan.integrations, plan.psfs, plan.outlier_rows
    own = workers.baseline + memory.WORKER_RETAINED + held(obs)
    peaks = task_peaks(obs, k, p, rows, plan.klip_rows, 12)
    assert own + waiting(obs, k, p, 2) + 2 * max(peaks.values()) > fraction * limit
    assert 1 <= plan.windows < 12

    block = dict(frames=k, npsf=obs.npsf, ny=160, nx=160, window=61, windows=plan.windows)
    measured = client.submit(
        measure, Case("companion_windows", block), (str(tmp_path), 0), pure=False
    ).result()
    predicted = plan.task_peaks["companion windows"]
    shown = f"{block}: predicted {predicted / MIB:.1f} MiB, measured {measured / MIB:.1f} MiB"
    assert measured <= predicted, shown
    others = own + waiting(obs, k, p, 2) + max(plan.task_peaks.values())
    assert others + measured <= plan.worker_peak <= fraction * limit, shown
