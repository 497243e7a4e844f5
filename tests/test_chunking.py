"""Chunk planning: blocks within the memory budget, enough blocks for the workers."""

from coron_dask.chunking import FIT_BYTES, PAIR_BYTES_PER_PIXEL, TASK_SHARE, plan_chunks

GIB = 2**30


def test_small_data_splits_for_parallelism_only():
    plan = plan_chunks(nints=[16, 16], npsf=40, frame=(160, 160), task_memory=2 * GIB, workers=2)
    assert plan.integrations == 8
    assert plan.psfs == 20  # 4 integration blocks x 2 reference blocks: 4 tasks per worker


def test_first_mode_splits_the_references_for_the_workers():
    plan = plan_chunks(
        nints=[10, 10], npsf=45, frame=(320, 320), task_memory=2 * GIB, workers=2, align_to="first"
    )
    assert 2 * -(-45 // plan.psfs) >= 8  # alignment tasks: 2 targets x reference blocks


def test_large_reference_sets_split_the_reference_axis():
    frame = (320, 320)
    plan = plan_chunks(nints=[20, 20], npsf=2000, frame=frame, task_memory=2 * GIB, workers=2)
    npix = frame[0] * frame[1]
    assert plan.integrations == 1
    assert 1 <= plan.psfs < 2000
    held = 2000 * npix * 8
    work = FIT_BYTES + plan.psfs * PAIR_BYTES_PER_PIXEL * npix
    assert work <= TASK_SHARE * (2 * GIB - held)


def test_never_below_one():
    plan = plan_chunks(nints=[1], npsf=1, frame=(4096, 4096), task_memory=1, workers=8)
    assert plan.integrations == 1 and plan.psfs == 1
