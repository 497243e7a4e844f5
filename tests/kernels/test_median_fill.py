"""Bad-pixel fill against jwst's median_replace_img."""

import numpy as np
import pytest
from jwst.coron.median_replace_img import median_replace_img
from stdatamodels.jwst.datamodels import CubeModel

from coron_dask.kernels import median_fill


def jwst_fill(data, dq, box, bits=1, instrument="NIRCAM"):
    model = CubeModel(data=data.astype(np.float32), dq=dq.astype(np.uint32))
    model.meta.instrument.name = instrument
    return median_replace_img(model, box, bits).data


def bad_cube(seed, shape=(3, 40, 48), fraction=0.03, margin=2):
    rng = np.random.default_rng(seed)
    data = rng.normal(10, 2, shape).astype(np.float32)
    bad = rng.random(shape) < fraction
    bad[:, :margin], bad[:, :, :margin] = False, False  # away from jwst's edge artefact
    dq = np.where(bad, 1, 0).astype(np.uint32)
    data[bad] = np.nan
    return data, dq, bad


@pytest.mark.parametrize("box", [3, 4, 5])
def test_matches_jwst_away_from_edges(box):
    data, dq, bad = bad_cube(box, margin=box // 2)
    ours = median_fill(data, bad, box)
    np.testing.assert_array_equal(ours, jwst_fill(data, dq, box))
    assert np.isfinite(ours).all()


def test_unflagged_nan_is_filled_like_jwst():
    data, dq, bad = bad_cube(7, fraction=0.005)
    data[1, 20, 20] = np.nan  # NaN without DQ flag: bad all the same
    ours = median_fill(data, bad | np.isnan(data), 3)
    np.testing.assert_array_equal(ours, jwst_fill(data, dq, 3))


def test_edge_window_is_cut_not_emptied():
    """jwst writes 0 into bad pixels of row 0 and column 0; we take the clipped window."""
    data = np.arange(36, dtype=np.float64).reshape(6, 6)
    bad = np.zeros_like(data, dtype=bool)
    bad[0, 3] = bad[4, 0] = True
    filled = median_fill(data, bad, 3)
    assert filled[0, 3] == np.median([2, 4, 8, 9, 10])
    assert filled[4, 0] == np.median([18, 19, 25, 30, 31])
    assert jwst_fill(data[None], bad[None].astype(np.uint32), 3)[0, 0, 3] == 0.0


def test_no_good_neighbours_gives_zero():
    data = np.full((5, 5), np.nan)
    data[0, 0] = 3.0
    bad = np.isnan(data)
    filled = median_fill(data, bad, 3)
    assert filled[4, 4] == 0.0
    assert filled[1, 1] == 3.0


def test_box_below_three_gives_zero_as_jwst():
    data, dq, bad = bad_cube(11, fraction=0.01)
    for box in (0, 1):
        np.testing.assert_array_equal(median_fill(data, bad, box), jwst_fill(data, dq, box))
