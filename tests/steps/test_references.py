"""References chosen per integration and zone (maxnumbasis): the chosen sets are the K most
correlated computed independently in numpy from the aligned frames, each zone's psfsub is
pyKLIP's ``klip_math`` on those K, with a 4-D and a 3-D psfalign; bad values refused."""

import dask
import dask.array as da
import numpy as np
import pytest

from coron_dask.core.errors import CoronInputError
from coron_dask.steps.klip import kl_basis, subtract
from coron_dask.steps.klip_parameters import klip_zones
from coron_dask.steps.reference_choice import check_maxnumbasis, selection
from tests.steps.test_klip_zones import NREF, NSCI, ROWS, SHAPE, STAR, check_zones, datasets

CUTOFFS = (1, 3, 5)


@pytest.fixture(scope="module")
def frames():
    """Targets (m, y, x) and references aligned to each (m, p, y, x), float32, whose
    references resemble the targets to different degrees (each a mix of a target's frame
    and another pattern), so the correlations are spread."""
    rng = np.random.default_rng(261)
    y, x = np.indices(SHAPE, dtype=np.float64)
    r, theta = np.hypot(x - STAR[0], y - STAR[1]), np.arctan2(y - STAR[1], x - STAR[0])
    core = 100 * np.exp(-r / 4)

    def speckles() -> np.ndarray:
        a = rng.normal(0, 2.0, 5)
        return sum(a[i] * np.cos((i + 1) * theta + r / (i + 2)) for i in range(5))

    targets = np.stack([core + speckles() for _ in range(NSCI)])
    refs = np.empty((NSCI, NREF, *SHAPE))
    for i in range(NSCI):
        for j in range(NREF):
            w = rng.uniform(0, 1)
            refs[i, j] = core * rng.uniform(0.9, 1.1) + w * (targets[i] - core) + speckles()
    noise = rng.normal(0, 0.3, refs.shape)
    return targets.astype(np.float32), (refs + noise).astype(np.float32)


def most_correlated(target, refs, inside, kept) -> np.ndarray:
    """Indices of the ``kept`` references most correlated with ``target`` on the pixels
    ``inside`` (numpy's Pearson correlation), most correlated first."""
    corr = np.array([np.corrcoef(target[inside], ref[inside])[0, 1] for ref in refs])
    return np.argsort(-corr, kind="stable")[:kept], np.sort(corr)[::-1][:kept]


@pytest.mark.parametrize("shared", [False, True], ids=["each", "first"])
def test_chosen_sets_are_the_most_correlated_and_psfsub_is_klip_math_on_them(shared, frames):
    """maxnumbasis 5 of 10 references in 2 annuli × 3 subsections: for each (integration,
    zone) the chosen set and its correlations are numpy's K most correlated; the psfsub
    and ERR are pyKLIP's klip_math on those K (a 3-D psfalign: its overlaps' own pass)."""
    targets, refs = frames
    refs = refs[0] if shared else refs
    zones = klip_zones(SHAPE, STAR, annuli=2, subsections=3, iwa=2.0, owa=20.0)
    kept = 5
    science, psfalign = datasets(targets, refs)
    chooser = selection(science["sci"].data, zones, kept, NREF)
    with dask.config.set(scheduler="synchronous"):
        basis = kl_basis(science, psfalign, CUTOFFS, rows=ROWS, zones=zones, chosen=chooser)
        psfsub = subtract(science, basis).compute()
        indices, correlations = (a.compute() for a in chooser.chosen())
        mask = basis.chosen.compute()
    assert indices.shape == (NSCI, zones.count, kept)
    for i in range(NSCI):
        for z in range(zones.count):
            frames_i = refs if shared else refs[i]
            expected, corr = most_correlated(targets[i], frames_i, zones.labels == z, kept)
            np.testing.assert_array_equal(indices[i, z], expected)
            np.testing.assert_allclose(correlations[i, z], corr, rtol=1e-9)
            assert set(np.flatnonzero(mask[i, z])) == set(expected)

    def refs_of(i: int, z: int) -> np.ndarray:
        return (refs if shared else refs[i])[np.sort(indices[i, z])]

    assert check_zones(psfsub, zones, targets, refs_of, CUTOFFS) < 1e-6


def test_eligibility_and_flags_leave_references_out_of_the_choice(frames):
    """References not eligible (a mask, as ADI's movement gives) and flagged ones (NaN
    frames) are never chosen; with fewer eligible than K every eligible one is used."""
    targets, refs = frames
    refs = refs.copy()
    refs[0, 2] = np.nan  # flagged for integration 0
    zones = klip_zones(SHAPE, STAR, annuli=2, subsections=2, iwa=2.0, owa=20.0)
    eligible = np.ones((NSCI, zones.count, NREF), bool)
    eligible[1, :, :7] = False  # three left for integration 1: fewer than K
    science, psfalign = datasets(targets, refs)
    chooser = selection(science["sci"].data, zones, 4, NREF)
    chooser.eligible = da.from_array(eligible, chunks=(2, -1, -1))
    with dask.config.set(scheduler="synchronous"):
        basis = kl_basis(science, psfalign, CUTOFFS, rows=ROWS, zones=zones, chosen=chooser)
        psfsub = subtract(science, basis).compute()
        indices, correlations = (a.compute() for a in chooser.chosen())
    assert not (indices[0] == 2).any()
    np.testing.assert_array_equal(np.sort(indices[1], axis=-1)[:, 1:], [[7, 8, 9]] * 4)
    assert (indices[1, :, 0] == -1).all() or (indices[1, :, -1] == -1).all()
    assert np.isnan(correlations[1, :, -1]).all() and (indices[2] >= 0).all()

    def refs_of(i: int, z: int) -> np.ndarray:
        return refs[i][np.sort(indices[i, z][indices[i, z] >= 0])]

    assert check_zones(psfsub, zones, targets, refs_of, CUTOFFS) < 1e-6


@pytest.mark.parametrize(
    "maxnumbasis, truncate, problem",
    [(0, 5, "at least 1"), (4, 5, "cannot give the 5 KL modes"), (3, (1, 3, 8), "the 8 KL")],
)
def test_bad_maxnumbasis_is_refused(maxnumbasis, truncate, problem):
    with pytest.raises(CoronInputError, match=problem) as error:
        check_maxnumbasis(maxnumbasis, truncate, NREF)
    assert error.value.source == "maxnumbasis"


def test_a_cutoff_above_the_references_asks_at_most_all_of_them():
    """truncate 50 with 10 references keeps 10 modes: maxnumbasis 10 (no choice) is fine,
    9 is refused as below the 10 modes kept."""
    check_maxnumbasis(NREF, 50, NREF)
    with pytest.raises(CoronInputError, match="cannot give the 10 KL modes"):
        check_maxnumbasis(NREF - 1, 50, NREF)


def test_no_choice_when_every_reference_is_kept(frames, caplog):
    """maxnumbasis not below the references: no choice made (KLIP as without it), logged."""
    targets, _ = frames
    caplog.set_level("INFO")
    assert selection(da.from_array(targets), None, NREF, NREF) is None
    assert "every reference used" in caplog.text
    assert selection(da.from_array(targets), None, None, NREF) is None


def test_a_reduction_with_maxnumbasis_is_pyklips_klip_dataset(asn, tmp_path):
    """The simulated observation's first exposure, references aligned to its first
    integration (one library for all, as pyKLIP's RDI), one zone between an IWA and an OWA
    (pyKLIP's RDI ranks its library by the PSFLibrary's correlation, one per frame: over
    that zone's pixels it is ours), 4 of the 6 references kept: pyKLIP's ``klip_dataset``
    (mode RDI, PSFLibrary correlations computed by pyKLIP on the zone, maxnumbasis 4)
    gives the same psfsub."""

    from coron_dask.pipeline.build import exposure_zones
    from coron_dask.pipeline.observation import open_association
    from coron_dask.steps.align_refs import align_refs
    from coron_dask.steps.klip import klip
    from coron_dask.steps.klip_selected import selected_basis
    from tests.pyklip_reference import klip_dataset_psfsub, pyklip_inputs, relative

    observation = open_association(asn, integrations=2)
    science = observation.science[0]
    psfalign, filled = align_refs(science, observation.psfstack, align_to="first")
    p = dict(annuli=1, subsections=1, annuli_spacing="constant", iwa=4.0, owa=30.0)
    zones = exposure_zones(science, p)
    numbasis, kept = [1, 2, 4], 4
    npsf = psfalign.sizes["psf"]
    chooser = selection(filled["sci"].data, zones, kept, npsf)
    with dask.config.set(scheduler="synchronous"):
        ours = klip(filled, psfalign, numbasis, zones=zones, chosen=chooser)["sci"].values
        indices = chooser.chosen()[0].compute()
        first, chosen_first, _ = selected_basis(filled, psfalign, numbasis, kept, zones=zones)
        ours_first = subtract(filled, first)["sci"].values  # the pipeline's: choice first
        np.testing.assert_array_equal(chosen_first.compute(), indices)
        frames = filled["sci"].values.astype(np.float64)
        refs = psfalign["sci"].values.astype(np.float64)
    m = len(frames)
    assert len({tuple(np.sort(row)) for row in indices[:, 0]}) >= 1 and (indices >= 0).all()
    zone = np.where(zones.labels == 0, 0.0, np.nan)  # pyKLIP's mask: 0 where it correlates
    dataset, library = pyklip_inputs(frames, refs, zones.star, p, correlation_zone=zone)
    theirs = klip_dataset_psfsub(
        dataset,
        tmp_path,
        p,
        numbasis,
        mode="RDI",
        fileprefix="chosen",
        maxnumbasis=kept,
        psf_library=library,
    )
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    assert relative(ours[finite], theirs[finite]) < 1e-6  # 2.6e-8 measured; 1e-3 asked
    assert relative(ours_first[finite], theirs[finite]) < 1e-6
    # the same references ranked by pyKLIP's own correlations
    for i in range(m):
        theirs_corr = library.correlation[i, library.isgoodpsf]
        np.testing.assert_array_equal(np.argsort(-theirs_corr, kind="stable")[:kept], indices[i, 0])


@pytest.mark.parametrize("shared", [False, True], ids=["each", "first"])
def test_choice_first_then_the_gram_of_the_chosen_is_the_same_klip(shared, frames):
    """``selected_basis``: the norms' pass, the choice, the Gram matrices of the K chosen
    only: the same chosen sets as numpy's most correlated, and the psfsub and ERR pyKLIP's
    klip_math on them (and the Gram matrices K × K)."""
    from coron_dask.steps.klip_selected import selected_basis

    targets, refs = frames
    refs = refs[0] if shared else refs
    zones = klip_zones(SHAPE, STAR, annuli=2, subsections=3, iwa=2.0, owa=20.0)
    kept = 5
    science, psfalign = datasets(targets, refs)
    with dask.config.set(scheduler="synchronous"):
        basis, indices, correlations = selected_basis(
            science, psfalign, CUTOFFS, kept, rows=ROWS, zones=zones
        )
        assert basis.gram.shape == (NSCI, zones.count, kept, kept)
        psfsub = subtract(science, basis).compute()
        indices, correlations = indices.compute(), correlations.compute()
    for i in range(NSCI):
        for z in range(zones.count):
            frames_i = refs if shared else refs[i]
            expected, corr = most_correlated(targets[i], frames_i, zones.labels == z, kept)
            np.testing.assert_array_equal(indices[i, z], expected)
            np.testing.assert_allclose(correlations[i, z], corr, rtol=1e-9)

    def refs_of(i: int, z: int) -> np.ndarray:
        return (refs if shared else refs[i])[np.sort(indices[i, z])]

    assert check_zones(psfsub, zones, targets, refs_of, CUTOFFS) < 1e-6


def test_choice_first_leaves_out_the_ineligible_and_the_flagged(frames):
    """``selected_basis`` with an eligibility mask (as ADI's movement gives) and a flagged
    reference: neither is chosen; with fewer eligible than K every eligible one is used;
    each zone's psfsub is pyKLIP's klip_math on the chosen."""
    from coron_dask.steps.klip_selected import selected_basis

    targets, refs = frames
    refs = refs.copy()
    refs[0, 2] = np.nan  # flagged for integration 0
    zones = klip_zones(SHAPE, STAR, annuli=2, subsections=2, iwa=2.0, owa=20.0)
    eligible = np.ones((NSCI, zones.count, NREF), bool)
    eligible[1, :, :7] = False  # three left for integration 1: fewer than K
    eligible[2, 1, 5:] = False
    science, psfalign = datasets(targets, refs)
    mask = da.from_array(eligible, chunks=(2, -1, -1))
    with dask.config.set(scheduler="synchronous"):
        basis, indices, _ = selected_basis(
            science, psfalign, CUTOFFS, 5, rows=ROWS, zones=zones, eligible=mask
        )
        psfsub = subtract(science, basis).compute()
        indices = indices.compute()
    assert not (indices[0] == 2).any() and not (indices[2, 1] >= 5).any()
    np.testing.assert_array_equal(np.sort(indices[1], axis=-1)[:, 2:], [[7, 8, 9]] * 4)
    assert (np.sort(indices[1], axis=-1)[:, :2] == -1).all()

    def refs_of(i: int, z: int) -> np.ndarray:
        return refs[i][np.sort(indices[i, z][indices[i, z] >= 0])]

    assert check_zones(psfsub, zones, targets, refs_of, CUTOFFS) < 1e-6
