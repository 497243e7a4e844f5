"""outlier_detection against jwst 3.0.0's coronagraphic detect_outliers on the same cube."""

import numpy as np
import pytest
from jwst.outlier_detection.coron import detect_outliers
from stdatamodels.jwst.datamodels import CubeModel

from coron_dask import open_exposure
from coron_dask.core.dqflags import PIXEL
from coron_dask.steps.outlier_detection import outlier_detection


@pytest.fixture
def exposure(observation_dir):
    """A science exposure with two cosmic rays and a NaN that DQ does not flag."""
    dataset = open_exposure(sorted(observation_dir.glob("jw01386001*_calints.fits"))[0])
    sci, err = dataset["sci"].values.copy(), dataset["err"].values.copy()
    sci[1, 20, 40] += 40 * err[1, 20, 40]
    sci[2, 50, 12] -= 30 * err[2, 50, 12]
    sci[0, 5, 5] = np.nan
    return dataset.assign(sci=(dataset["sci"].dims, sci), err=(dataset["err"].dims, err))


def assert_flags_of_jwst(ours, exposure) -> None:
    """``ours`` (flagged, computed) has the DQ, SCI and ERR jwst's detect_outliers gives
    ``exposure``, bit for bit."""
    model = CubeModel(
        data=exposure["sci"].values.copy(),
        err=exposure["err"].values.copy(),
        dq=exposure["dq"].values.copy(),
    )
    theirs = detect_outliers(model, False, "~DO_NOT_USE", 0.7, 5.0, None)
    np.testing.assert_array_equal(ours["dq"].values, theirs.dq)
    np.testing.assert_array_equal(ours["sci"].values, theirs.data)
    np.testing.assert_array_equal(ours["err"].values, theirs.err)


@pytest.mark.parametrize("rows", [None, 1, 7, 64])
def test_flags_and_nans_match_jwst(exposure, rows):
    """The median in slabs of any number of rows, as for a huge exposure; the flagged
    exposure keeps the blocks of its input (whole frames)."""
    flagged = outlier_detection(exposure.chunk({"integration": 1}), rows=rows)
    assert flagged["sci"].data.chunks == ((1, 1, 1), (64,), (64,))
    ours = flagged.compute()
    assert_flags_of_jwst(ours, exposure)
    outlier = PIXEL["DO_NOT_USE"] | PIXEL["OUTLIER"]
    assert ours["dq"].values[1, 20, 40] & outlier == outlier
    assert ours["dq"].values[2, 50, 12] & outlier == outlier
    assert np.isnan(ours["sci"].values[1, 20, 40])
    assert ours["dq"].values[0, 5, 5] & PIXEL["DO_NOT_USE"]


def test_snr_must_be_positive(exposure):
    from coron_dask.core.errors import CoronInputError

    with pytest.raises(CoronInputError, match="snr"):
        outlier_detection(exposure, snr=0)


@pytest.mark.parametrize("rows", [3, 64])
def test_median_slabs_read_from_the_file(observation_dir, rows):
    """Slabs read straight from the file (no exchange between integration blocks) give
    jwst's flags; the median's tasks read only their rows."""
    path = sorted(observation_dir.glob("jw01386001*_calints.fits"))[0]
    exposure = open_exposure(path, {"integration": 1})
    slabs = open_exposure(path, {"integration": -1, "y": rows})
    flagged = outlier_detection(exposure, slabs=slabs)
    layers = flagged["dq"].data.__dask_graph__().layers
    rechunked = [name for name in layers if name.startswith("rechunk")]
    # only the median image (2-D: keys of name and two indices) is put together
    assert all(len(next(iter(layers[name].keys()))) == 3 for name in rechunked)
    assert_flags_of_jwst(flagged.compute(), exposure)
