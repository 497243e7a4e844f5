"""outlier_detection against jwst 3.0.0's coronagraphic detect_outliers on the same cube."""

import importlib

import numpy as np
import pytest
from jwst.outlier_detection.coron import detect_outliers
from stdatamodels.jwst.datamodels import CubeModel

from coron_dask import open_exposure
from coron_dask.dqflags import PIXEL
from coron_dask.steps import outlier_detection

module = importlib.import_module("coron_dask.steps.outlier_detection")


@pytest.fixture
def exposure(observation_dir):
    """A science exposure with two cosmic rays and a NaN that DQ does not flag."""
    dataset = open_exposure(sorted(observation_dir.glob("jw01386001*_calints.fits"))[0])
    sci, err = dataset["sci"].values.copy(), dataset["err"].values.copy()
    sci[1, 20, 40] += 40 * err[1, 20, 40]
    sci[2, 50, 12] -= 30 * err[2, 50, 12]
    sci[0, 5, 5] = np.nan
    return dataset.assign(sci=(dataset["sci"].dims, sci), err=(dataset["err"].dims, err))


@pytest.mark.parametrize("rows_per_block", [None, 7])
def test_flags_and_nans_match_jwst(exposure, rows_per_block, monkeypatch):
    if rows_per_block:  # several row blocks for the median, as for a huge exposure
        nints, _, nx = exposure["sci"].shape
        monkeypatch.setattr(module, "MEDIAN_BLOCK_BYTES", rows_per_block * nints * nx * 4)
    ours = outlier_detection(exposure.chunk({"integration": 1})).compute()
    model = CubeModel(
        data=exposure["sci"].values.copy(),
        err=exposure["err"].values.copy(),
        dq=exposure["dq"].values.copy(),
    )
    theirs = detect_outliers(model, False, "~DO_NOT_USE", 0.7, 5.0, None)
    np.testing.assert_array_equal(ours["dq"].values, theirs.dq)
    np.testing.assert_array_equal(ours["sci"].values, theirs.data)
    np.testing.assert_array_equal(ours["err"].values, theirs.err)
    outlier = PIXEL["DO_NOT_USE"] | PIXEL["OUTLIER"]
    assert ours["dq"].values[1, 20, 40] & outlier == outlier
    assert ours["dq"].values[2, 50, 12] & outlier == outlier
    assert np.isnan(ours["sci"].values[1, 20, 40])
    assert ours["dq"].values[0, 5, 5] & PIXEL["DO_NOT_USE"]


def test_snr_must_be_positive(exposure):
    from coron_dask.errors import CoronInputError

    with pytest.raises(CoronInputError, match="snr"):
        outlier_detection(exposure, snr=0)
