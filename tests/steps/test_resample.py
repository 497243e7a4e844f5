"""resample's weights, as jwst's: inverse read-noise variance, ERR² where there is none,
DO_NOT_USE and NON_SCIENCE left out; ERR propagated through the same weights.

Exposures with one WCS drizzle pixel onto pixel (square kernel, pixfrac 1), so the i2d
is the weighted mean of the integrations, pixel by pixel, computed here directly."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from coron_dask.core.dqflags import PIXEL
from coron_dask.science.simulate import wcs_keywords
from coron_dask.steps.resample import resample

SHAPE = (3, 12, 10)


def exposure(rng, variance: bool, flagged: dict):
    """A science exposure and its psfsub on one WCS; ``flagged`` DQ bits by pixel."""
    sci = rng.normal(size=SHAPE).astype(np.float32)
    err = rng.uniform(1, 2, SHAPE).astype(np.float32)
    dq = np.zeros(SHAPE, np.uint32)
    for (i, y, x), bits in flagged.items():
        dq[i, y, x] |= bits
    attrs = wcs_keywords(np.array([5.0, 6.0]), (10.0, 20.0), 0.0)
    dims = ("integration", "y", "x")
    variables = {"sci": (dims, da.from_array(sci), attrs), "err": (dims, da.from_array(err))}
    variables["dq"] = (dims, da.from_array(dq))
    if variance:
        var = rng.uniform(0.5, 3, SHAPE).astype(np.float32)
        variables["var_rnoise"] = (dims, da.from_array(var))
    science = xr.Dataset(variables)
    psfsub = science[["sci", "dq"]].assign(sci=science["sci"] * 2)
    return science, psfsub


@pytest.mark.parametrize("variances", [(True, True), (True, False), (False, False)])
def test_i2d_is_the_inverse_variance_weighted_mean(variances):
    rng = np.random.default_rng(5)
    flags = [
        {(0, 3, 4): PIXEL["NON_SCIENCE"], (1, 7, 2): PIXEL["DO_NOT_USE"]},
        {(2, 3, 4): PIXEL["NON_SCIENCE"] | PIXEL["DO_NOT_USE"], (0, 1, 1): PIXEL["SATURATED"]},
    ]
    pairs = [exposure(rng, v, f) for v, f in zip(variances, flags, strict=True)]
    i2d, _ = resample([p for _, p in pairs], [s for s, _ in pairs])
    i2d = i2d.compute()

    data, errors, weights = [], [], []
    for science, psfsub in pairs:
        s = science.compute()
        var = s["var_rnoise"].values if "var_rnoise" in s else s["err"].values ** 2
        bad = (s["dq"].values & (PIXEL["DO_NOT_USE"] | PIXEL["NON_SCIENCE"])) > 0
        weights.append(np.where(bad, 0, 1 / var.astype(np.float64)))
        data.append(psfsub["sci"].values)
        errors.append(s["err"].values.astype(np.float64))
    w, d, e = (np.concatenate(a) for a in (weights, data, errors))
    total = w.sum(axis=0)
    assert i2d["sci"].shape == SHAPE[1:]
    np.testing.assert_allclose(i2d["wht"], total, rtol=1e-5)
    np.testing.assert_allclose(i2d["sci"], (w * d).sum(axis=0) / total, rtol=1e-4, atol=1e-6)
    expected_err = np.sqrt((w**2 * e**2).sum(axis=0)) / total
    np.testing.assert_allclose(i2d["err"], expected_err, rtol=1e-4)
    # the flagged pixels weigh nothing; SATURATED alone is kept, as jwst's good bits
    assert (w == 0).sum() == 3


def test_a_pixel_every_integration_rejects_leaves_no_trace():
    """A NON_SCIENCE pixel of 1e6 in every integration: the i2d there has no weight of its
    own (only drizzle's overlap of rounding size from its neighbours) and none of its value."""
    rng = np.random.default_rng(6)
    every = {(i, 4, 4): PIXEL["NON_SCIENCE"] for i in range(SHAPE[0])}
    science, psfsub = exposure(rng, True, every)
    psfsub["sci"] = psfsub["sci"].where(psfsub["dq"] == 0, 1e6)
    i2d, _ = resample([psfsub], [science])
    i2d = i2d.compute()
    assert i2d["wht"].values[4, 4] < 1e-6 * np.median(i2d["wht"].values)
    assert np.nanmax(np.abs(i2d["sci"].values)) < 100
