"""Steps on lazy data: stack coordinates, the shapes of both align_to modes, one KL basis
per exposure in 'first' mode, and jwst's MIRI NON_SCIENCE rule in the fill."""

import numpy as np
import xarray as xr

from coron_dask import open_association
from coron_dask.core.dqflags import PIXEL
from coron_dask.steps.align_refs import align_refs, median_replace_img
from coron_dask.steps.klip import kl_basis, klip, subtract
from tests.conftest import count_computes


def test_stack_refs_labels_every_frame(asn):
    observation = open_association(asn)
    stack = observation.psfstack
    assert stack.sizes["psf"] == 6
    assert list(stack["psf_integration"].values) == [1, 2, 1, 2, 1, 2]
    names = stack["psf_exposure"].values
    assert len(set(names)) == 3 and names[0] == names[1] != names[2]
    assert stack.attrs["TARGNAME"] == "HD 2000 REF"


def test_align_modes_shapes_and_laziness(asn):
    observation = open_association(asn, integrations=1)
    science = observation.science[0]
    with count_computes() as counter:
        each, filled = align_refs(science, observation.psfstack, align_to="each")
        first, _ = align_refs(science, observation.psfstack, align_to="first")
        psfsub = klip(filled, first, truncate=4)
    assert counter.count == 0
    assert each["sci"].dims == ("integration", "psf", "y", "x")
    assert each["sci"].shape == (3, 6, 64, 64) and each["sci"].dtype == np.float32
    assert first["sci"].dims == ("psf", "y", "x")
    assert each["shift"].dims == ("integration", "psf", "param")
    # the first integration's alignment is the same in both modes
    xr.testing.assert_equal(each["sci"].isel(integration=0, drop=True), first["sci"])
    assert psfsub["sci"].shape == (3, 64, 64)


def test_first_mode_builds_one_basis_per_exposure(asn):
    observation = open_association(asn, integrations=1)
    psfalign, filled = align_refs(observation.science[0], observation.psfstack, align_to="first")
    graph = klip(filled, psfalign, truncate=4)["sci"].data.__dask_graph__()
    weights_tasks = [k for k in graph if str(k).startswith("('klip-weights-")]
    assert len(weights_tasks) == 1
    assert filled["sci"].data.numblocks[0] == 3


def test_each_mode_sums_the_sciences_overlaps_in_the_gram_pass(asn):
    """A basis per integration: the science's overlaps come from the pass that sums the
    Gram matrix (no pass of their own), and its psfsub is bit for bit that of the same
    cube subtracted as another cube is (an injected one: a pass of its own)."""
    observation = open_association(asn, integrations=2)
    psfalign, filled = align_refs(observation.science[0], observation.psfstack)
    basis = kl_basis(filled, psfalign, truncate=4)
    psfsub = subtract(filled, basis)
    graph = psfsub["sci"].data.__dask_graph__()
    assert not [k for k in graph if str(k).startswith("('klip-overlaps-")]
    other = filled.assign(sci=filled["sci"].copy(data=filled["sci"].data + np.float32(0)))
    separate = subtract(other, basis)
    assert any(str(k).startswith("('klip-overlaps-") for k in separate["sci"].data.dask)
    np.testing.assert_array_equal(psfsub["sci"].values, separate["sci"].values)


def test_miri_non_science_pixels_become_zero(asn):
    science = open_association(asn).science[0]
    dq = science["dq"].values.copy()
    sci = science["sci"].values.copy()
    dq[:, :, :5] |= PIXEL["NON_SCIENCE"] | PIXEL["DO_NOT_USE"]
    sci[:, :, :5] = np.nan
    exposure = science.assign(sci=(science["sci"].dims, sci), dq=(science["dq"].dims, dq))
    nircam = median_replace_img(exposure)["sci"].values
    exposure.attrs["INSTRUME"] = "MIRI"
    miri = median_replace_img(exposure)["sci"].values
    assert np.all(miri[:, :, :5] == 0)
    assert np.all(nircam[:, :, :4] == 0)  # no good neighbours there at all
    assert np.isfinite(miri).all() and np.isfinite(nircam).all()
