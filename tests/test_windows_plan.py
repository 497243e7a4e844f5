"""The companions' windows in the block plan, through the pipeline: a reduction planned for
workers too small for all the windows in one task makes them in groups (and here, blocks
of one integration), and the fmwindows product is bit-identical to one planned for large
workers (all the windows in one task, blocks of two integrations)."""

import dask
import numpy as np
from astropy.io import fits

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError
from coron_dask.io import write_products
from coron_dask.pipeline.build import reduce_observation
from coron_dask.pipeline.companions import Guess, window_shape, windows_product
from coron_dask.pipeline.observation import open_association, plan_observation
from coron_dask.planning.block_plan import Workers
from coron_dask.science.companion_fit import FitSettings
from coron_dask.science.companion_model import window_for
from coron_dask.science.injection import read_offaxis_psf

GIB = 2**30
#: twelve companions about the star of the small observation (64², 0.063"/px), whose
#: windows (73², for λ/D of 4 px) make the largest task of a block of one integration
GUESSES = [Guess(0.6, angle) for angle in range(5, 360, 30)]
RESOLUTION = 4.0
PARAMETERS = dict(truncate=(2, 5), save_psfalign=False, skip=("resample",))


def planned_windows(psf, settings) -> tuple[int, tuple[int, int]]:
    """The windows' count and shape, as ``measure_companions`` tells the plan."""
    return len(GUESSES), window_for((0.0, 0.0), *window_shape(psf, settings, RESOLUTION))[1]


def _fmwindows(asn, psfmask, folder, workers, **given) -> tuple:
    """The fmwindows product of a reduction planned for ``workers``, written; its plan."""
    psf = read_offaxis_psf(psfmask.parent / "offaxis_psf.fits")
    settings = FitSettings.configured()
    windows = planned_windows(psf, settings)
    reduction = reduce_observation(
        asn, folder, psfmask=psfmask, workers=workers, windows=windows, **PARAMETERS, **given
    )
    product = windows_product(reduction, GUESSES, psf, RESOLUTION, settings, folder, "fm")
    tasks = product.extensions[1].data.numblocks[0]  # KLWIN0's groups of windows
    with dask.config.set(scheduler="synchronous"):
        write_products([*reduction.products, product])
    return product.path, reduction.plan, tasks


def test_windows_in_groups_give_the_same_product(observation_dir, asn, tmp_path, caplog):
    psfmask = observation_dir / "psfmask.fits"
    large = Workers(1, 1, 64 * GIB, 0)
    psf = read_offaxis_psf(observation_dir / "offaxis_psf.fits")
    windows = planned_windows(psf, FitSettings.configured())
    opened, fraction = open_association(asn), float(config.get("chunks.memory-fraction"))
    settings = {**config.resolve_parameters(**PARAMETERS), "integrations": 1}

    def group(limit: int) -> int:
        """Windows per task planned for a worker of ``limit`` bytes (0: nothing fits)."""
        try:
            return plan_observation(opened, Workers(1, 1, limit, 0), settings, 0, windows).windows
        except CoronInputError:
            return 0

    # the largest limit (to a byte) whose plan, one integration a block, cannot take the
    # twelve windows in one task
    low, high = 2**20, GIB
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if group(middle) == 12 else (middle, high)
    limit, small = low, Workers(1, 1, low, 0)

    whole, whole_plan, one_task = _fmwindows(asn, psfmask, tmp_path / "a", large)
    with caplog.at_level("INFO", logger="coron_dask.pipeline.build"):
        grouped, plan, tasks = _fmwindows(asn, psfmask, tmp_path / "b", small, integrations=1)
    assert (whole_plan.windows, one_task, whole_plan.integrations) == (12, 1, 2)
    assert 1 <= plan.windows < 12 and tasks == -(-12 // plan.windows)
    # the windows' tasks and their writes are the largest: what made the groups
    assert max(plan.task_peaks, key=plan.task_peaks.get) in ("companion windows", "write")
    assert plan.integrations == 1 and plan.worker_peak <= fraction * limit
    assert f"{plan.windows} companion window(s) per task" in caplog.text
    with fits.open(whole) as ours, fits.open(grouped) as theirs:
        assert [h.name for h in ours] == [h.name for h in theirs]
        for a, b in zip(ours[1:], theirs[1:], strict=True):
            assert a.data.dtype == b.data.dtype
            np.testing.assert_array_equal(a.data, b.data)
            assert a.header == b.header
        assert np.isfinite(ours["KLWIN0"].data).any()
