"""How to cut the work into blocks that fit the workers' memory: pure planning, no dask.

A KLIP block is some science integrations with all the references aligned to them; an
alignment block is some science integrations with a slice of the references. Blocks are
sized so that a task's working set stays within a budget per worker thread, and an
association gives at least two blocks per worker when it can, so all of them work.
"""

from dataclasses import dataclass

from coron_dask.kernels.klip import TILE
from coron_dask.kernels.registration import BATCH_PIXELS, BYTES_PER_BATCH_PIXEL

#: Share of a worker thread's memory one task may use: the rest holds blocks waiting to be
#: written or consumed, and stays under dask's spill (0.7) and pause (0.8) thresholds.
TASK_SHARE = 0.25
#: Bytes of the shift fit's batch of frames (spectra, model images, residuals).
FIT_BYTES = BATCH_PIXELS * BYTES_PER_BATCH_PIXEL
#: Bytes per pixel per (integration, reference) pair of an alignment block: the float32
#: output and the float64 shifted frame and reference spectrum it is made from.
PAIR_BYTES_PER_PIXEL = 20
#: KLIP keeps its float64 KL images (up to ``truncate`` of them) and tiles of references.
KLIP_TILE_BYTES_PER_REFERENCE = 2 * 8 * TILE


@dataclass(frozen=True)
class ChunkPlan:
    """Science integrations per block, and references per alignment block."""

    integrations: int
    psfs: int


def plan_chunks(
    *,
    nints: list[int],
    npsf: int,
    frame: tuple[int, int],
    task_memory: int,
    workers: int = 1,
    truncate: int = 50,
    align_to: str = "each",
) -> ChunkPlan:
    """Plan blocks for science exposures of ``nints`` integrations and ``npsf`` references.

    ``task_memory`` is the memory of one worker thread (a worker's limit over its threads).
    The reference axis is also split when alignment would otherwise give fewer than four
    tasks per worker thread (with ``align_to="first"`` there is one target per exposure).
    """
    npix = frame[0] * frame[1]
    # every worker may hold all the filled references (SCI and ERR, float32) for alignment
    held = npsf * npix * 4 * 2
    budget = max(1, int((task_memory - held) * TASK_SHARE))
    klip_fixed = min(truncate, npsf) * 8 * npix + npsf * KLIP_TILE_BYTES_PER_REFERENCE
    by_klip = (budget - klip_fixed) // (npsf * 4 * npix)
    # at least two blocks per exposure, and two per worker over the whole association
    by_parallelism = min(min(-(-n // 2) for n in nints), max(1, sum(nints) // (2 * workers)))
    integrations = int(max(1, min(by_klip, by_parallelism)))
    room = budget - FIT_BYTES
    by_memory = room // (integrations * PAIR_BYTES_PER_PIXEL * npix)
    targets = len(nints) if align_to == "first" else sum(-(-n // integrations) for n in nints)
    splits = -(-4 * workers // targets)  # reference blocks per target block
    psfs = int(max(1, min(npsf, by_memory, -(-npsf // splits))))
    return ChunkPlan(integrations=integrations, psfs=psfs)
