"""How to cut the work into blocks that fit the workers' memory: pure planning, no dask.

A worker's memory holds its own baseline (the interpreter and the libraries tasks import),
the freed memory its heaps keep (``memory.WORKER_RETAINED``), what waits between tasks
(the filled science frames, KL images and Gram matrices of the targets under way: the
references, filled and aligned, are on disk) and, on each of its threads, one running
task (``memory`` predicts each kind's peak from its block). The plan takes the largest
blocks for which all of that stays within ``fraction`` of the worker's memory limit
(under dask's spill threshold, 0.7), with enough blocks for every worker thread; if even
the smallest blocks do not fit, it refuses, saying what would. A companions' reduction
(``pipeline.companions``) adds the tasks of their KL images on windows: the plan splits
the windows into groups, a task each, or, when even one window does not fit, takes fewer
integrations per block.
"""

from dataclasses import dataclass

from coron_dask.core.errors import CoronInputError
from coron_dask.planning import memory
from coron_dask.planning.memory import Frame

GIB = 2**30


@dataclass(frozen=True)
class Workers:
    """The workers a run plans for: how many, threads and memory limit of each, and the
    memory a worker uses before it runs a task (its baseline), in bytes."""

    count: int
    threads: int
    memory_limit: int
    baseline: int

    def describe(self) -> str:
        return (
            f"{self.count} worker(s) × {self.threads} thread(s), "
            f"{self.memory_limit / GIB:.2f} GiB each, baseline {self.baseline / GIB:.2f} GiB"
        )


@dataclass(frozen=True)
class Observation:
    """The sizes that decide the blocks."""

    science_nints: tuple[int, ...]
    psf_nints: tuple[int, ...]
    frame: tuple[int, int]
    truncate: int | tuple[int, ...] = 50  # several: a KL-mode cube
    align_to: str = "each"
    save_psfalign: bool = True
    format: str = "fits"
    injections: int = 0  # sets of companions subtracted on the same bases (contrast)
    zones: int | None = None  # KLIP's zones (annuli × subsections); None: the whole frame
    maxnumbasis: int | None = None  # references chosen per integration and zone; None: all
    own_bases: bool = False  # each injected set has KL bases of its own (ADI's references)
    companions: int = 0  # windows of KL images made (companions' forward model): how many
    window: tuple[int, int] = (0, 0)  # and their shape (wy, wx)
    negative: int = 0  # ADI companions: pixels of each one's negative-injection windows

    @property
    def kept(self) -> int | None:
        """References chosen per integration and zone, or None: every one (no choice)."""
        chosen = self.maxnumbasis is not None and self.maxnumbasis < self.npsf
        return self.maxnumbasis if chosen else None

    @property
    def npsf(self) -> int:
        return sum(self.psf_nints)

    @property
    def planes(self) -> int:
        """KL cutoffs: the images each psfsub integration has."""
        return 1 if isinstance(self.truncate, int) else len(self.truncate)

    @property
    def count(self) -> int:
        """KL images per basis: the largest cutoff, at most the number of references."""
        return min(
            self.truncate if isinstance(self.truncate, int) else max(self.truncate), self.npsf
        )

    @property
    def err_count(self) -> int:
        """KL images the ERR is made from: the largest cutoff below the number of references
        (0: the ERR is 0, no task makes it)."""
        cutoffs = (self.truncate,) if isinstance(self.truncate, int) else self.truncate
        return max((k for k in cutoffs if k < self.npsf), default=0)


@dataclass(frozen=True)
class BlockPlan:
    """Science integrations per block, references per alignment block, rows per outlier
    median slab and per KLIP tile, companion windows per companion-windows task (0: none);
    the predicted peak of a worker and of each task kind."""

    integrations: int
    psfs: int
    outlier_rows: int
    klip_rows: int
    worker_peak: int
    task_peaks: dict
    windows: int = 0

    def describe(self) -> str:
        kind, peak = max(self.task_peaks.items(), key=lambda item: item[1])
        windows = f", {self.windows} companion window(s) per task" if self.windows else ""
        return (
            f"{self.integrations} integration(s) × {self.psfs} reference(s) per alignment "
            f"block, {self.outlier_rows} row(s) per outlier median slab, {self.klip_rows} "
            f"row(s) per KLIP tile{windows}; predicted worker peak "
            f"{self.worker_peak / GIB:.2f} GiB (largest task: {kind}, {peak / 2**20:.0f} MiB)"
        )


def tile_rows(npsf: int, frame: tuple[int, int], tile_bytes: int) -> int:
    """Rows of a KLIP tile: all ``npsf`` references (float32) over as many whole rows as
    fit in ``tile_bytes``, at least one. It depends on the data and the setting only, never
    on the workers, so the products do not either."""
    return int(max(1, min(frame[0], tile_bytes // (npsf * frame[1] * 4))))


def held(obs: Observation) -> int:
    """Bytes every worker may hold for the whole alignment: the PSFMASK. The filled
    references are on disk: each alignment task reads its block."""
    return 8 * Frame(*obs.frame).pixels


def waiting(obs: Observation, integrations: int, psfs: int, threads: int) -> int:
    """Bytes waiting between tasks on a worker, for each block under way (one per thread
    and the next): a flagged block of an exposure (SCI, ERR, DQ) waiting for its fill and
    its writes; and of a target block, its filled science frames (and each injected set's,
    for a contrast curve), the references' means (over each zone), its Gram matrices and KL
    weights (one per zone), ERR and overlaps (with each zone's references), and with ADI
    each injected set's own means, Gram matrices and KL weights. No reference
    waits: the references, filled and aligned, are written by the tasks that make them and
    read back by the tasks that use them (``io.products.write_blocks``)."""
    frame = Frame(*obs.frame)
    targets = integrations if obs.align_to == "each" else 1
    npsf, count, zones = obs.npsf, obs.count, obs.zones or 1
    flagged = 12 * max(integrations, psfs) * frame.pixels
    if obs.kept:  # a choice per integration: its norms and overlaps, K² Gram matrices
        targets = integrations
        grams = 8 * targets * zones * (2 * npsf + obs.kept * obs.kept + obs.kept)
    else:
        grams = 8 * targets * zones * npsf * (npsf + 1)
    per_target = (
        4 * (1 + obs.injections) * integrations * frame.pixels  # filled, and each injected
        + 8 * targets * npsf * zones
        + grams
        + 16 * targets * zones * npsf * count
        + 8 * targets * obs.planes * frame.pixels
        + 8 * integrations * zones * npsf
    )
    if obs.own_bases:  # each injected set's bases (ADI; on the science's choice: p² Gram)
        per_target += obs.injections * (
            8 * targets * npsf * zones
            + 8 * targets * zones * npsf * (npsf + 1)
            + 16 * targets * zones * npsf * count
        )
    return (threads + 1) * (flagged + per_target)


def negative_injection(obs: Observation, k: int, frame: Frame) -> dict:
    """An ADI companion's tasks (``steps.negative_injection``): its references read whole
    (the 3-D psfalign, or a block's targets' of a 4-D one) and its arrays on its windows'
    pixels, for every zone (an upper bound of those its windows touch); a basis per
    integration with ``align_to="each"`` (the exposure's longest)."""
    shared = obs.align_to == "first"
    bases = 1 if shared else max(obs.science_nints)
    zones = obs.zones or 1
    return {
        "companion aligned read": memory.read((1 if shared else k) * obs.npsf, frame.pixels),
        "companion negative injection": memory.companion_adi(
            bases, obs.npsf, obs.negative, obs.negative, zones, zones, not shared
        ),
    }


def task_peaks(
    obs: Observation,
    integrations: int,
    psfs: int,
    outlier_rows: int,
    klip_rows: int,
    windows: int = 1,
) -> dict:
    """Predicted peak of each task kind for these blocks (bytes), with ``windows`` of the
    companions' windows per task."""
    frame = Frame(*obs.frame)
    k, p, npsf, count, planes = integrations, psfs, obs.npsf, obs.count, obs.planes
    zones = obs.zones
    targets = k if obs.align_to == "each" else 1
    shared = obs.align_to == "first"
    longest = max(obs.science_nints + obs.psf_nints)
    zarr = obs.save_psfalign and obs.format == "zarr"
    klip = {
        "klip gram": memory.klip_gram(targets, npsf, klip_rows, frame, not shared, zones),
        "klip weights": memory.klip_weights(targets, npsf, count, zones),
    }
    if obs.kept:  # chosen first: the norms' pass, then K² Gram matrices, a basis each
        klip = {
            "klip norms": memory.klip_norms(k, npsf, klip_rows, frame, shared, zones),
            "klip gram": memory.klip_chosen_gram(
                k, npsf, obs.kept, klip_rows, frame, shared, zones
            ),
            "klip weights": memory.klip_chosen_weights(k, npsf, obs.kept, count, zones),
        }
    # with a choice, a basis per integration: the ERR's and the subtraction's weights too
    each, sole = (k, False) if obs.kept else (targets, shared)
    # the KL images of ``windows`` companions' windows (float64), written into a FITS file
    windows = min(windows, obs.companions)
    windowing = memory.companion_windows(k, npsf, count, obs.window, frame, windows, zones)
    made = 8 * windows * k * count * obs.window[0] * obs.window[1]
    return {
        "read": memory.read(max(k, p), frame.pixels),
        "outlier median": memory.outlier_median(longest, outlier_rows, frame.nx),
        "outlier flag": memory.outlier_flag(max(k, p), frame),
        "fill": memory.fill(max(k, p), frame),
        "fit": memory.fit(targets, p, frame),
        "shift": memory.shift(targets, p, frame, zarr, zones),
        **klip,
        **(
            {"klip err": memory.klip_errors(each, npsf, klip_rows, frame, below, planes, zones)}
            if (below := obs.err_count)
            else {}
        ),
        "klip overlaps": memory.klip_overlaps(k, npsf, klip_rows, frame, shared, zones),
        "klip subtract": memory.klip_project(k, npsf, klip_rows, frame, count, sole, planes, zones),
        "resample": memory.resample(k, frame, 4 * frame.pixels, planes),
        # companions added to a block of integrations (a contrast curve), PSF as big as a frame
        **({"inject": memory.inject(k, frame, frame.pixels)} if obs.injections else {}),
        # an injected set's own bases (ADI): its targets' aligned references whole
        **(
            {"inject klip": memory.inject_klip(targets, npsf, klip_rows, frame, zones)}
            if obs.injections and obs.own_bases
            else {}
        ),
        **({"companion windows": windowing} if obs.companions else {}),
        **(negative_injection(obs, k, frame) if obs.negative else {}),
        # the products' stores; psfalign's ERR is written by its shift task, as SCI is
        "write": max(
            memory.write(
                4 * targets * p * frame.pixels,
                4 * p * frame.pixels if p < npsf else None,  # runs of p references
                buffered=not zarr,
            ),
            memory.write(4 * planes * k * frame.pixels, buffered=obs.format == "fits"),  # psfsub
            memory.write(made) if obs.companions else 0,  # companions' windows
        ),
    }


def alignment_tasks(obs: Observation, threads: int, per_thread: int, least: int) -> int:
    """How many alignment tasks a plan asks for, at least: ``per_thread`` for each worker
    thread, since a stop loses the blocks under way and a run taken up does them again;
    fewer where blocks would hold less than ``least`` bytes of aligned frames (a small
    run's tasks would cost more in overhead than a stop could lose); never fewer than two
    per thread, for dask to balance."""
    targets = len(obs.science_nints) if obs.align_to == "first" else sum(obs.science_nints)
    aligned = 4 * targets * obs.npsf * Frame(*obs.frame).pixels
    return max(2 * threads, min(per_thread * threads, aligned // least))


def plan_blocks(
    obs: Observation,
    workers: Workers,
    *,
    fraction: float = 0.6,
    tile_bytes: int = 8 * 2**20,
    tasks_per_thread: int = 16,
    block_least: int = 32 * 2**20,
    integrations: int | None = None,
    psfs: int | None = None,
    outlier_rows: int | None = None,
) -> BlockPlan:
    """The largest blocks whose predicted worker peak stays within ``fraction`` of the
    memory limit, with at least two integration blocks per worker thread (when the
    exposures allow) and ``alignment_tasks`` (``tasks_per_thread``, ``block_least``) when
    the pairs allow. Of the integrations per block that fit, the one that needs the fewest
    alignment tasks (the larger, on a tie: fewer KLIP tasks). The companions' windows
    (``obs.companions``) in groups as large as fit with those blocks, one window a task at
    least (else fewer integrations). Blocks given
    (``integrations``, ``psfs``, ``outlier_rows``) are taken as they are, and checked.

    Raises CoronInputError, before anything is computed, when nothing fits.
    """
    frame = Frame(*obs.frame)
    threads = workers.count * workers.threads
    own = workers.baseline + memory.WORKER_RETAINED + held(obs)
    capacity = fraction * workers.memory_limit - own
    klip_rows = tile_rows(obs.npsf, obs.frame, tile_bytes)
    wanted = alignment_tasks(obs, threads, tasks_per_thread, block_least)
    shortest = min(obs.science_nints)
    by_parallelism = min(-(-shortest // 2), max(1, sum(obs.science_nints) // (2 * threads)))
    candidates = [integrations] if integrations else range(max(1, by_parallelism), 0, -1)

    def fits(k: int, p: int, rows: int, windows: int = 1) -> tuple[bool, int, dict]:
        peaks = task_peaks(obs, k, p, rows, klip_rows, windows)
        need = waiting(obs, k, p, workers.threads) + workers.threads * max(peaks.values())
        return need <= capacity, need, peaks

    def largest(bound: int, ok) -> int | None:
        """The largest n in 1..bound with ok(n) (ok is monotone: true up to some n)."""
        if not ok(1):
            return None
        low, high = 1, bound
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if ok(middle) else (low, middle - 1)
        return low

    best = None
    for k in candidates:
        rows = outlier_rows or largest(frame.ny, lambda r: fits(k, psfs or 1, r)[0])  # noqa: B023
        if rows is None:
            continue
        targets = len(obs.science_nints) if obs.align_to == "first" else None
        targets = targets or sum(-(-n // k) for n in obs.science_nints)
        splits = -(-wanted // targets)  # reference blocks per target block
        bound = max(1, obs.npsf // splits)
        p = psfs or largest(bound, lambda p: fits(k, p, rows)[0])  # noqa: B023
        if p is None:
            continue
        p = psfs or -(-obs.npsf // -(-obs.npsf // p))  # as many blocks, of even sizes
        # the companions' windows: as many a task as fit (0: there are none)
        windows = obs.companions and largest(obs.companions, lambda n: fits(k, p, rows, n)[0])  # noqa: B023
        ok, need, peaks = fits(k, p, rows, windows or 1)
        if ok:
            tasks = targets * -(-obs.npsf // p)
            if best is None or tasks < best[0]:
                best = tasks, BlockPlan(k, p, rows, klip_rows, own + need, peaks, windows or 0)
    if best is not None:
        return best[1]
    # the memory of the smallest blocks, or of the blocks given with the others at 1
    given = {"integrations": integrations, "psfs": psfs, "outlier_rows": outlier_rows}
    k, p, rows = (value or 1 for value in given.values())
    smallest = max(task_peaks(obs, k, p, rows, klip_rows).values())

    def minimum(threads: int) -> float:
        """The memory limit a worker of ``threads`` threads needs for those blocks."""
        return (own + waiting(obs, k, p, threads) + threads * smallest) / fraction / GIB

    blocks = ", ".join(f"{name} {value}" for name, value in given.items() if value)
    raise CoronInputError(
        "memory",
        f"{obs.frame[0]}x{obs.frame[1]} frames with {obs.npsf} references"
        f"{f' in the blocks given ({blocks})' if blocks else ''} need workers of "
        f"at least {minimum(workers.threads):.2f} GiB ({minimum(1):.2f} GiB per worker "
        f"thread, {workers.threads} thread(s) each); the workers have "
        f"{workers.memory_limit / GIB:.2f} GiB (--memory-limit, or fewer threads per worker"
        f"{', or smaller blocks' if blocks else ''})",
    )
