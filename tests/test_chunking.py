"""Block planning: predicted worker peaks within the share of the limit, enough blocks for
the workers, KLIP tiles that do not depend on the workers, impossible plans refused."""

import pytest

from coron_dask.core.errors import CoronInputError
from coron_dask.planning import memory
from coron_dask.planning.block_plan import (
    Observation,
    Workers,
    held,
    plan_blocks,
    task_peaks,
    waiting,
)

GIB = 2**30
MIB = 2**20


def workers(limit: float, count: int = 2, threads: int = 1) -> Workers:
    return Workers(count, threads, int(limit * GIB), 200 * MIB)


@pytest.mark.parametrize("limit", [1, 2, 4, 16])
@pytest.mark.parametrize("align_to", ["each", "first"])
@pytest.mark.parametrize(
    ("frame", "science", "psf"),
    [
        ((320, 320), (50, 50), (20,) * 11),  # the out-of-core case: 220 references
        ((224, 288), (150, 150), (65,) * 16),  # MIRI-sized: 1040 references
        ((64, 64), (3, 3), (2, 2, 2)),
    ],
)
def test_plans_stay_within_the_share_of_the_limit(limit, align_to, frame, science, psf):
    obs = Observation(science, psf, frame, truncate=20, align_to=align_to)
    try:
        plan = plan_blocks(obs, workers(limit), fraction=0.6)
    except CoronInputError as error:
        assert "need workers of at least" in str(error)
        return
    assert plan.worker_peak <= 0.6 * limit * GIB
    assert 1 <= plan.integrations <= max(science) and 1 <= plan.psfs <= sum(psf)
    assert 1 <= plan.outlier_rows <= frame[0] and 1 <= plan.klip_rows <= frame[0]


@pytest.mark.parametrize(
    ("align_to", "least", "tasks"),
    [
        # 2 × 16 targets × 40 references of 160² float32: 131 MB of aligned frames
        ("each", 32 * MIB, 4),  # 3 blocks of 32 MiB: two a thread instead
        ("each", 8 * MIB, 16),  # 15 blocks of 8 MiB: 4 targets × 4 reference blocks
        ("each", 1 * MIB, 32),  # sixteen a thread
        # 2 targets × 40 references: 8 MB
        ("first", 32 * MIB, 4),
        ("first", 1 * MIB, 8),  # 7 blocks: 2 targets × 4 reference blocks
        ("first", 64 * 2**10, 40),  # sixteen a thread: 2 targets × 20 blocks of 2 references
    ],
)
def test_alignment_tasks_follow_the_settings(align_to, least, tasks):
    """Sixteen alignment tasks a worker thread (a stop loses the blocks under way) unless
    blocks would hold less than ``block_least`` of aligned frames, two a thread at least;
    for the planner's smallest count, integrations per block as large as allowed."""
    obs = Observation((16, 16), (5,) * 8, (160, 160), align_to=align_to)
    plan = plan_blocks(obs, workers(2), fraction=0.6, block_least=least)
    if align_to == "each":
        assert plan.integrations == 8  # two blocks per exposure, two per worker thread
    targets = 2 if align_to == "first" else 2 * -(-16 // plan.integrations)
    assert targets * -(-40 // plan.psfs) == tasks


def test_less_memory_gives_smaller_blocks_not_other_results():
    obs = Observation((50, 50), (20,) * 11, (320, 320), truncate=20)
    small, large = (plan_blocks(obs, workers(limit), fraction=0.6) for limit in (2, 8))
    assert small.integrations * small.psfs <= large.integrations * large.psfs
    assert small.outlier_rows <= large.outlier_rows
    assert small.klip_rows == large.klip_rows  # the tiles are part of the numerics


def test_impossible_plan_is_refused_in_one_line():
    obs = Observation((50, 50), (20,) * 11, (320, 320), truncate=20)
    with pytest.raises(CoronInputError) as caught:
        plan_blocks(obs, workers(0.25), fraction=0.6)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("memory: 320x320 frames with 220 references need workers of at least")
    assert "the workers have 0.25 GiB" in message
    minimum = float(message.split("at least ")[1].split(" GiB")[0])
    plan_blocks(obs, workers(minimum + 0.01), fraction=0.6)  # the stated minimum suffices


def test_blocks_given_are_kept():
    obs = Observation((16, 16), (5,) * 8, (160, 160))
    plan = plan_blocks(obs, workers(2), fraction=0.6, integrations=1, psfs=3, outlier_rows=5)
    assert (plan.integrations, plan.psfs, plan.outlier_rows) == (1, 3, 5)


def test_minimum_per_thread_is_that_of_a_one_thread_worker():
    """With several threads per worker the stated per-thread minimum is what a worker of
    one thread needs: enough for it, and less than the minimum of the given workers."""
    obs = Observation((50, 50), (20,) * 11, (320, 320), truncate=20)
    with pytest.raises(CoronInputError) as caught:
        plan_blocks(obs, workers(0.25, threads=4), fraction=0.6)
    message = str(caught.value)
    total = float(message.split("at least ")[1].split(" GiB")[0])
    per_thread = float(message.split("(")[1].split(" GiB per worker thread")[0])
    assert "4 thread(s) each" in message and per_thread < total
    plan_blocks(obs, workers(per_thread + 0.01, threads=1), fraction=0.6)
    plan_blocks(obs, workers(total + 0.01, threads=4), fraction=0.6)


def test_zones_gram_matrices_are_planned_for():
    """KLIP in 20 zones keeps 20 Gram matrices and sets of KL weights per target between
    tasks: 1040 references (MIRI's out-of-core library) on 2 GiB workers take fewer
    integrations per block than one zone, the plan still within its share; on 1 GiB
    workers the zones need more than a worker has, and the refusal says so."""
    obs = Observation((150, 150), (65,) * 16, (224, 288), truncate=20)
    zoned = Observation((150, 150), (65,) * 16, (224, 288), truncate=20, zones=20)
    one, many = (plan_blocks(o, workers(2), fraction=0.6) for o in (obs, zoned))
    assert many.integrations < one.integrations
    assert many.worker_peak <= 0.6 * 2 * GIB
    plan_blocks(obs, workers(1), fraction=0.6)
    with pytest.raises(CoronInputError, match="need workers of at least"):
        plan_blocks(zoned, workers(1), fraction=0.6)


def test_companion_windows_are_planned_for():
    """The KL images of twelve companions' windows (61², 50 KL modes of 100 references on
    160² frames) fit 1 GiB workers of two threads in groups of windows, a task each, with
    the integrations per block of a reduction without them: the group the largest whose
    worker peak stays within the share (one more window crosses it); 4 GiB take all twelve
    in one task. Windows of 151² that do not fit even one a task with those integrations
    take fewer integrations per block; on 0.5 GiB workers nothing fits, and the refusal
    says so where the reduction alone fits."""
    base = Observation((20, 20), (10,) * 10, (160, 160), truncate=50)
    obs = Observation((20, 20), (10,) * 10, (160, 160), truncate=50, companions=12, window=(61, 61))
    small = workers(1, count=1, threads=2)
    alone, plan = plan_blocks(base, small, fraction=0.6), plan_blocks(obs, small, fraction=0.6)
    assert plan.integrations == alone.integrations and 1 <= plan.windows < 12
    assert plan.worker_peak <= 0.6 * GIB
    assert "companion windows" in plan.task_peaks
    assert f", {plan.windows} companion window(s) per task" in plan.describe()
    own = small.baseline + memory.WORKER_RETAINED + held(obs)
    k, p, rows = plan.integrations, plan.psfs, plan.outlier_rows
    peaks = task_peaks(obs, k, p, rows, plan.klip_rows, plan.windows + 1)
    one_more = own + waiting(obs, k, p, 2) + 2 * max(peaks.values())
    assert one_more > 0.6 * GIB  # the next group size would cross the share
    assert plan_blocks(obs, workers(4, count=1, threads=2), fraction=0.6).windows == 12
    assert alone.windows == 0 and "companion windows" not in alone.task_peaks

    base = Observation((20, 20), (10,) * 10, (160, 160), truncate=100)
    wide = Observation(
        (20, 20), (10,) * 10, (160, 160), truncate=100, companions=3, window=(151, 151)
    )
    one = workers(0.75, count=1)
    alone, plan = plan_blocks(base, one, fraction=0.6), plan_blocks(wide, one, fraction=0.6)
    assert (plan.windows, alone.integrations) == (1, 9) and plan.integrations < 9
    assert plan.worker_peak <= 0.6 * 0.75 * GIB
    plan_blocks(base, workers(0.5, count=1), fraction=0.6)
    with pytest.raises(CoronInputError, match="need workers of at least"):
        plan_blocks(wide, workers(0.5, count=1), fraction=0.6)


def test_an_adi_companions_negative_injection_is_planned_for():
    """ADI companions: the block plan counts the negative injection's tasks (the aligned
    references read whole with one basis per exposure, and the arrays on the windows'
    pixels of every zone, ``memory.companion_adi``); 270 references on 320² frames fit
    1 GiB workers, and a window of 600² pixels that would not fit is refused in one line
    where the reduction alone fits."""
    common = dict(truncate=50, align_to="first", zones=20)
    base = Observation((20, 20), (30,) * 9, (320, 320), **common)
    obs = Observation((20, 20), (30,) * 9, (320, 320), negative=2 * 47 * 47, **common)
    plan = plan_blocks(obs, workers(1, count=1), fraction=0.6)
    expected = memory.companion_adi(1, 270, 2 * 47 * 47, 2 * 47 * 47, 20, 20, False)
    assert plan.task_peaks["companion negative injection"] == expected
    assert plan.task_peaks["companion aligned read"] == memory.read(270, 320 * 320)
    assert "companion negative injection" not in plan_blocks(base, workers(1, count=1)).task_peaks
    huge = Observation((20, 20), (30,) * 9, (320, 320), negative=600 * 600, **common)
    plan_blocks(base, workers(0.75, count=1), fraction=0.6)
    with pytest.raises(CoronInputError, match="need workers of at least"):
        plan_blocks(huge, workers(0.75, count=1), fraction=0.6)
