"""ADI and ADI+RDI against pyKLIP: the movement of a companion between rolls is pyKLIP's
``estimate_movement``; the references an integration keeps zone by zone (the other roll's
integrations where the roll moves a companion by ``movement`` pixels at least, the
reference star's everywhere) give each zone pyKLIP's ``klip_math`` on those references, and
a reduction with annuli, subsections, movement and a KL-mode cube pyKLIP's ``klip_dataset``
(mode ADI+RDI, a PSF library of the reference star's frames) on the same aligned frames."""

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.utils import key_split
from pyklip import klip as pyklip

from coron_dask.core.errors import CoronInputError
from coron_dask.steps.klip import kl_basis, klip, subtract
from coron_dask.steps.klip_parameters import klip_zones
from coron_dask.steps.references import (
    contiguous_blocks,
    eligible_references,
    fewest_references,
    movements,
    reference_pool,
    references_of,
    zone_radii,
)
from tests.pyklip_reference import klip_dataset_psfsub, pyklip_inputs, relative
from tests.steps.test_klip_zones import (
    CUTOFFS,
    ROWS,
    SHAPE,
    STAR,
    _frames,
    check_zones,
)

ROLLS = (0.0, 10.0)  # two rolls 10° apart, as JWST's
NINT, NRDI = 4, 6  # integrations per roll; reference star's frames


@pytest.fixture(scope="module")
def frames():
    """The science integrations of two rolls (2·NINT, y, x) and the reference star's
    (NRDI, y, x), float32, already aligned (the star on the same pixel)."""
    rng = np.random.default_rng(126)
    return _frames(rng, 2 * NINT), _frames(rng, NRDI)


def _exposure(sci: np.ndarray, roll: float, name: str) -> xr.Dataset:
    data = da.from_array(sci, chunks=(2, -1, -1))
    exposure = xr.Dataset(
        {
            "sci": (("integration", "y", "x"), data),
            "err": (("integration", "y", "x"), data),
            "dq": (("integration", "y", "x"), np.zeros(sci.shape, np.uint32)),
        },
        coords={"integration": np.arange(1, len(sci) + 1)},
        attrs={"PA_V3": roll},
    )
    exposure["sci"].attrs["ROLL_REF"] = roll
    exposure.encoding["source"] = name
    return exposure


def _pool(frames, mode: str) -> tuple[list[xr.Dataset], xr.Dataset]:
    science, rdi = frames
    exposures = [
        _exposure(science[k * NINT : (k + 1) * NINT], roll, f"roll{k}.fits")
        for k, roll in enumerate(ROLLS)
    ]
    refs = xr.Dataset(
        {"sci": (("psf", "y", "x"), da.from_array(rdi)), "err": (("psf", "y", "x"), rdi)},
        coords={"psf": np.arange(NRDI)},
        attrs={"PA_V3": 113.0},
    )
    return exposures, reference_pool(refs, exposures, mode)


def test_movement_is_pyklips_estimate_movement():
    """2·r·sin(Δθ/2) for each zone's radius and roll: pyKLIP's movement of a source."""
    radii = np.array([3.0, 12.5, 40.0])
    rolls = np.array([0.0, 10.0, -7.0, 350.0, 120.0])
    ours = movements(radii, rolls, 0.0)
    for r, row in zip(radii, ours, strict=True):
        np.testing.assert_allclose(row, pyklip.estimate_movement(r, 0.0, rolls), rtol=1e-12)


def test_zone_radius_is_pyklips_mean_of_the_annulus_edges():
    """(radstart + radend) / 2 of each annulus, for each of its subsections; without an
    OWA the last annulus reaches the frame's height, as pyKLIP's full image."""
    zones = klip_zones(SHAPE, STAR, annuli=3, subsections=2, iwa=2.0)
    edges = zones.edges
    assert edges[-1] == SHAPE[0]
    expected = np.repeat((edges[:-1] + edges[1:]) / 2, 2)
    np.testing.assert_array_equal(zone_radii(zones, SHAPE), expected)
    assert zone_radii(None, SHAPE)[0] == SHAPE[0] / 2


@pytest.mark.parametrize("mode", ["ADI", "ADI+RDI"])
def test_references_of_a_roll_are_the_other_rolls_after_the_reference_stars(frames, mode):
    """psfalign's planes: the reference star's frames first (ADI+RDI), then the other roll's
    integrations, never the same roll's; the blocks an alignment task reads are contiguous."""
    exposures, pool = _pool(frames, mode)
    rdi = NRDI if "RDI" in mode else 0
    assert pool.sizes["psf"] == rdi + 2 * NINT
    for k, roll in enumerate(ROLLS):
        places = references_of(pool, roll)
        other = 1 - k
        expected = [*range(rdi), *range(rdi + other * NINT, rdi + (other + 1) * NINT)]
        np.testing.assert_array_equal(places, expected)
        assert set(pool["psf_roll"].values[places[rdi:]]) == {ROLLS[other]}
        assert (pool["psf_kind"].values[places] == ["RDI"] * rdi + ["ADI"] * NINT).all()
    assert contiguous_blocks(np.array([0, 1, 2, 3, 4, 5, 10, 11, 12]), 4) == (4, 2, 3)
    assert fewest_references(exposures, NRDI, mode) == rdi + NINT
    with pytest.raises(CoronInputError, match=r"mode.*one roll"):
        fewest_references(exposures[:1], NRDI, mode)


def _reduction(frames, movement: float, zones, mode: str = "ADI+RDI", cutoffs=CUTOFFS):
    """Our ``mode`` psfsub of each roll on references aligned already (the planes of
    psfalign taken from the pool), the references' movement mask, and the references each
    target may use in each zone (for pyKLIP's klip_math)."""
    exposures, pool = _pool(frames, mode)
    out, used = [], []
    for exposure, roll in zip(exposures, ROLLS, strict=True):
        places = references_of(pool, roll)
        refs = pool["sci"].values[places]
        psfalign = xr.Dataset(
            {
                "sci": (
                    ("integration", "psf", "y", "x"),
                    da.from_array(
                        np.broadcast_to(refs, (NINT, *refs.shape)).copy(), chunks=(2, 5, -1, -1)
                    ),
                )
            },
            coords={k: ("psf", pool[k].values[places]) for k in ("psf_kind", "psf_roll")},
        )
        chosen = eligible_references(psfalign, roll, zones, movement, (2, 2))
        with dask.config.set(scheduler="synchronous"):
            out.append(klip(exposure, psfalign, cutoffs, rows=ROWS, zones=zones, chosen=chosen))
            mask = chosen.compute()
        used.append((refs, mask))
    return [o.compute(scheduler="synchronous") for o in out], used


def test_each_zone_is_pyklips_klip_math_on_the_references_moved_enough(frames):
    """ADI+RDI in 3 annuli × 2 subsections: in the inner annulus the 10° roll moves a
    companion by less than ``movement`` and the other roll is left out (RDI only), farther
    out it is used; each zone's psfsub and ERR are pyKLIP's klip_math on those references."""
    zones = klip_zones(SHAPE, STAR, annuli=3, subsections=2, iwa=2.0, owa=19.0)
    movement = 1.5
    moved = movements(zone_radii(zones, SHAPE), np.array([10.0]), 0.0)[:, 0]
    assert (moved < movement).any() and (moved >= movement).any()  # both cases met
    psfsubs, used = _reduction(frames, movement, zones)
    targets = frames[0]
    for k, (psfsub, (refs, mask)) in enumerate(zip(psfsubs, used, strict=True)):
        kept = mask[0].sum(axis=1)
        np.testing.assert_array_equal(kept, np.where(moved >= movement, NRDI + NINT, NRDI))
        science = targets[k * NINT : (k + 1) * NINT]
        used_by = {(i, z): refs[mask[i, z]] for i in range(NINT) for z in range(zones.count)}
        assert check_zones(psfsub, zones, science, lambda i, z, used=used_by: used[i, z]) < 1e-6


@pytest.mark.parametrize("mode", ["ADI+RDI", "ADI"])
def test_a_reduction_is_pyklips_klip_dataset(frames, tmp_path, mode):
    """The two rolls' integrations reduced ADI+RDI (or ADI) with annuli, subsections,
    movement and a KL-mode cube: pyKLIP's ``klip_dataset`` (the same mode, the reference
    star's frames its PSF library, every eligible reference used, not derotated) gives the
    same psfsub; ADI leaves the inner annulus, where the roll moves nothing by ``movement``,
    unreduced (NaN), as pyKLIP does."""
    p = dict(annuli=3, subsections=2, annuli_spacing="constant", iwa=2.0, owa=19.0)
    zones = klip_zones(SHAPE, STAR, **p)
    movement = 1.5
    numbasis = (1, 2, NINT)  # ADI: the other roll's NINT integrations at most
    psfsubs, _ = _reduction(frames, movement, zones, mode, numbasis)
    ours = np.concatenate([psfsub["sci"].values for psfsub in psfsubs], axis=1)
    science, library_frames = (f.astype(np.float64) for f in frames)
    m = len(science)
    dataset, library = pyklip_inputs(
        science, library_frames, STAR, p, parangs=np.repeat(ROLLS, NINT)
    )
    theirs = klip_dataset_psfsub(
        dataset,
        tmp_path,
        p,
        numbasis,
        mode=mode,
        fileprefix="adi",
        movement=movement,
        aligned_center=list(STAR),  # without a library pyKLIP's default is another
        maxnumbasis=m + NRDI,
        psf_library=library if "RDI" in mode else None,
    )
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    assert finite.sum() > 0.5 * finite.size
    inner = zones.labels[None, None] < 2  # the first annulus's two subsections
    assert np.isnan(theirs[np.broadcast_to(inner, theirs.shape)]).all() == (mode == "ADI")
    assert relative(ours[finite], theirs[finite]) < 1e-6  # 1e-3 asked


def test_one_choice_for_every_integration_keeps_one_basis_with_a_3d_psfalign(frames):
    """ADI's movement choice depends on the zone alone: given once (1, Z, p) to a 3-D
    psfalign (``--align-to first``) it makes one basis per zone for the exposure, not one
    per integration, and the same psfsub and ERR bit for bit as the choice given to every
    integration."""
    exposures, pool = _pool(frames, "ADI+RDI")
    exposure, roll = exposures[0], ROLLS[0]
    places = references_of(pool, roll)
    coords = {k: ("psf", pool[k].values[places]) for k in ("psf_kind", "psf_roll")}
    refs = da.from_array(pool["sci"].values[places], chunks=(5, -1, -1))
    psfalign = xr.Dataset({"sci": (("psf", "y", "x"), refs)}, coords=coords)
    zones = klip_zones(SHAPE, STAR, annuli=3, subsections=2, iwa=2.0, owa=19.0)
    chosen = eligible_references(psfalign, roll, zones, 1.5, (2, 2))
    assert not chosen.compute().all()  # the inner annulus leaves the other roll out
    bases, psfsubs = {}, {}
    for name, given in (("every", chosen), ("once", chosen[:1])):
        bases[name] = kl_basis(exposure, psfalign, CUTOFFS, rows=ROWS, zones=zones, chosen=given)
        psfsubs[name] = subtract(exposure, bases[name]).compute(scheduler="synchronous")

    def weight_tasks(basis) -> int:
        return sum(key_split(key) == "klip-weights" for key in basis.weights.__dask_graph__())

    assert weight_tasks(bases["once"]) == 1
    assert weight_tasks(bases["every"]) == len(chosen.chunks[0])
    for variable in ("sci", "err"):
        np.testing.assert_array_equal(psfsubs["once"][variable], psfsubs["every"][variable])
