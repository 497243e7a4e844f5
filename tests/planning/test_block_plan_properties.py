"""Properties of the block planner for any observation and any workers (hypothesis): a plan
always fits the capacity the planner defines (every task kind's predicted peak on each
thread, what waits and the worker's own memory, within ``fraction`` of the limit); it is
refused, in one line, exactly when the minimum it states exceeds the limit; blocks given by
hand are kept when they fit and refused when they do not."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coron_dask.core.errors import CoronInputError
from coron_dask.planning import memory
from coron_dask.planning.block_plan import (
    Observation,
    Workers,
    held,
    plan_blocks,
    task_peaks,
    tile_rows,
    waiting,
)

GIB = 2**30
MIB = 2**20
#: few examples each: the planner is pure arithmetic, the whole module runs in seconds
PROPERTY = settings(
    max_examples=80,
    deadline=None,
    database=None,  # no .hypothesis folder left behind: the examples are drawn afresh
    suppress_health_check=[HealthCheck.too_slow],
)
#: "need workers of at least 1.23 GiB (0.45 GiB per worker thread, ...": the stated minima
STATED = re.compile(r"at least (\d+\.\d\d) GiB \((\d+\.\d\d) GiB per worker thread")
ROUNDING = 0.006  # GiB: the message rounds to 0.01 GiB


@st.composite
def observations(draw) -> Observation:
    """Frames from a few pixels to larger than NIRCam's full array, one to four science
    exposures, up to thirty reference exposures, one cutoff or a KL-mode cube, KLIP over
    the whole frame or in up to forty zones."""
    side = st.integers(4, 2100)
    cutoffs = st.integers(1, 300)
    truncate = draw(
        st.one_of(
            cutoffs,
            st.lists(cutoffs, min_size=1, max_size=5, unique=True).map(lambda c: tuple(sorted(c))),
        )
    )
    return Observation(
        science_nints=tuple(draw(st.lists(st.integers(1, 200), min_size=1, max_size=4))),
        psf_nints=tuple(draw(st.lists(st.integers(1, 100), min_size=1, max_size=30))),
        frame=(draw(side), draw(side)),
        truncate=truncate,
        align_to=draw(st.sampled_from(["each", "first"])),
        save_psfalign=draw(st.booleans()),
        format=draw(st.sampled_from(["fits", "zarr"])),
        injections=draw(st.integers(0, 3)),
        zones=draw(st.one_of(st.none(), st.integers(1, 40))),  # KLIP's zones, if any
    )


@st.composite
def worker_sets(draw) -> Workers:
    """1 to 16 workers of 1 to 8 threads, 64 MiB to 256 GiB each (log-spaced), with a
    baseline of 50 MiB to 1 GiB."""
    limit = int(2 ** draw(st.floats(26, 38)))
    return Workers(
        count=draw(st.integers(1, 16)),
        threads=draw(st.integers(1, 8)),
        memory_limit=limit,
        baseline=draw(st.integers(50 * MIB, GIB)),
    )


fractions = st.sampled_from([0.3, 0.5, 0.6, 0.7])
tiles = st.sampled_from([2**20, 8 * 2**20, 64 * 2**20])


def need(obs: Observation, workers: Workers, k: int, p: int, rows: int, tile: int) -> dict:
    """The planner's model for these blocks: its worker total and each task kind's share
    of the worker (what the worker holds and waits for, and the task on every thread)."""
    klip_rows = tile_rows(obs.npsf, obs.frame, tile)
    peaks = task_peaks(obs, k, p, rows, klip_rows)
    base = workers.baseline + memory.WORKER_RETAINED + held(obs)
    base += waiting(obs, k, p, workers.threads)
    return {kind: base + workers.threads * peak for kind, peak in peaks.items()}


def assert_fits(plan, obs: Observation, workers: Workers, fraction: float, tile: int) -> None:
    """The plan's blocks are in range, its predictions are the model's for its blocks, and
    every one of them is within ``fraction`` of the limit."""
    capacity = fraction * workers.memory_limit
    assert 1 <= plan.integrations <= max(obs.science_nints)
    assert 1 <= plan.psfs <= obs.npsf
    assert 1 <= plan.outlier_rows <= obs.frame[0]
    assert plan.klip_rows == tile_rows(obs.npsf, obs.frame, tile)
    klip = plan.klip_rows
    assert plan.task_peaks == task_peaks(obs, plan.integrations, plan.psfs, plan.outlier_rows, klip)
    totals = need(obs, workers, plan.integrations, plan.psfs, plan.outlier_rows, tile)
    assert plan.worker_peak == max(totals.values())
    assert plan.worker_peak <= capacity
    assert all(total <= capacity for total in totals.values())


def stated(error: CoronInputError, workers: Workers) -> tuple[float, float]:
    """The refusal is one line saying the workers' limit and the minima (GiB): for workers
    of this many threads, and per worker thread."""
    message = str(error)
    assert "\n" not in message and message.startswith("memory: ")
    assert f"the workers have {workers.memory_limit / GIB:.2f} GiB" in message
    assert f"{workers.threads} thread(s) each" in message
    found = STATED.search(message)
    assert found, message
    return float(found[1]), float(found[2])


@PROPERTY
@given(obs=observations(), workers=worker_sets(), fraction=fractions, tile=tiles)
def test_a_plan_fits_or_is_refused_below_its_stated_minimum(obs, workers, fraction, tile):
    try:
        plan = plan_blocks(obs, workers, fraction=fraction, tile_bytes=tile)
    except CoronInputError as error:
        minimum, per_thread = stated(error, workers)
        assert workers.memory_limit / GIB < minimum + ROUNDING
        assert per_thread <= minimum
        # the smallest blocks are what the minimum is the memory of: they do not fit
        smallest = need(obs, workers, 1, 1, 1, tile)
        assert max(smallest.values()) > fraction * workers.memory_limit
        return
    assert_fits(plan, obs, workers, fraction, tile)
    # two integration blocks per worker thread at most ask for blocks of half an exposure
    assert plan.integrations <= -(-min(obs.science_nints) // 2)


@PROPERTY
@given(obs=observations(), workers=worker_sets(), fraction=fractions, tile=tiles)
def test_refused_exactly_when_the_stated_minimum_exceeds_the_limit(obs, workers, fraction, tile):
    """The minimum read from a refusal (workers of a few MiB) is the limit at which the
    planner changes its mind: a plan just above it, a refusal just below; and the stated
    per-thread minimum is enough for a worker of one thread."""
    tiny = Workers(workers.count, workers.threads, 2**20, workers.baseline)
    with pytest.raises(CoronInputError) as refused:
        plan_blocks(obs, tiny, fraction=fraction, tile_bytes=tile)
    minimum, per_thread = stated(refused.value, tiny)

    def with_limit(gib: float, threads: int = workers.threads) -> Workers:
        return Workers(workers.count, threads, int(gib * GIB), workers.baseline)

    enough = with_limit(minimum + ROUNDING)
    assert_fits(
        plan_blocks(obs, enough, fraction=fraction, tile_bytes=tile), obs, enough, fraction, tile
    )
    one = with_limit(per_thread + ROUNDING, threads=1)
    assert_fits(plan_blocks(obs, one, fraction=fraction, tile_bytes=tile), obs, one, fraction, tile)
    if minimum > ROUNDING:
        short = with_limit(minimum - ROUNDING)
        with pytest.raises(CoronInputError) as again:
            plan_blocks(obs, short, fraction=fraction, tile_bytes=tile)
        assert stated(again.value, short)[0] == minimum


@st.composite
def blocks_given(draw, obs: Observation) -> dict:
    """Any of integrations, psfs and outlier_rows, within the observation's sizes (small
    ones as often as any: those are the blocks that fit)."""
    bounds = {
        "integrations": max(obs.science_nints),
        "psfs": obs.npsf,
        "outlier_rows": obs.frame[0],
    }
    return {
        name: draw(st.none() | st.integers(1, min(bound, 8)) | st.integers(1, bound))
        for name, bound in bounds.items()
    }


@PROPERTY
@given(data=st.data(), workers=worker_sets(), fraction=fractions, tile=tiles)
def test_blocks_given_are_kept_when_they_fit_and_refused_when_not(data, workers, fraction, tile):
    """Blocks given by hand are taken as they are if the model says they fit (the others
    planned around them); if they cannot fit, whatever the planner chooses for the others
    (at least one of each), the run is refused in one line that states what they need."""
    obs = data.draw(observations())
    blocks = data.draw(blocks_given(obs))
    k, p, rows = (blocks[n] or 1 for n in ("integrations", "psfs", "outlier_rows"))
    fits = max(need(obs, workers, k, p, rows, tile).values()) <= fraction * workers.memory_limit
    try:
        plan = plan_blocks(obs, workers, fraction=fraction, tile_bytes=tile, **blocks)
    except CoronInputError as error:
        assert not fits, str(error)
        minimum, _ = stated(error, workers)
        assert workers.memory_limit / GIB < minimum + ROUNDING
        given_ = [f"{name} {value}" for name, value in blocks.items() if value]
        if given_:
            assert f"in the blocks given ({', '.join(given_)})" in str(error)
        return
    assert fits
    assert_fits(plan, obs, workers, fraction, tile)
    chosen = {"integrations": plan.integrations, "psfs": plan.psfs}
    chosen["outlier_rows"] = plan.outlier_rows
    assert {name: chosen[name] for name, value in blocks.items() if value} == {
        name: value for name, value in blocks.items() if value
    }


def tasks_of(obs: Observation, integrations: int, psfs: int) -> int:
    """Alignment tasks of blocks of ``integrations`` × ``psfs``: one per target block and
    reference block."""
    targets = (
        len(obs.science_nints)
        if obs.align_to == "first"
        else sum(-(-n // integrations) for n in obs.science_nints)
    )
    return targets * -(-obs.npsf // psfs)


@PROPERTY
@given(
    obs=observations(),
    workers=worker_sets(),
    fraction=fractions,
    per_thread=st.integers(1, 64),
    least=st.sampled_from([2**10, 2**20, 32 * 2**20, 2**30]),
)
def test_a_stop_loses_one_alignment_block_in_tasks_per_thread(
    obs, workers, fraction, per_thread, least
):
    """Each worker thread has ``tasks_per_thread`` alignment blocks, as far as the pairs
    allow (one reference a block) and unless blocks would hold less than ``block_least``
    of aligned frames: what a stop loses, the blocks under way, is at most that share of
    the alignment; never fewer than two a thread; the plan still fits."""
    try:
        plan = plan_blocks(
            obs, workers, fraction=fraction, tasks_per_thread=per_thread, block_least=least
        )
    except CoronInputError:
        return
    assert_fits(plan, obs, workers, fraction, 8 * MIB)
    threads = workers.count * workers.threads
    tasks = tasks_of(obs, plan.integrations, plan.psfs)
    most = tasks_of(obs, plan.integrations, 1)
    targets = len(obs.science_nints) if obs.align_to == "first" else sum(obs.science_nints)
    aligned = 4 * targets * obs.npsf * obs.frame[0] * obs.frame[1]
    assert tasks >= min(per_thread * threads, aligned // least, most)
    assert tasks >= min(2 * threads, most)
