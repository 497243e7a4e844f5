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
from coron_dask.steps.references import check_maxnumbasis, selection
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
        check_maxnumbasis(maxnumbasis, truncate)
    assert error.value.source == "maxnumbasis"


def test_no_choice_when_every_reference_is_kept(frames, caplog):
    """maxnumbasis not below the references: no choice made (KLIP as without it), logged."""
    targets, _ = frames
    caplog.set_level("INFO")
    assert selection(da.from_array(targets), None, NREF, NREF) is None
    assert "every reference used" in caplog.text
    assert selection(da.from_array(targets), None, None, NREF) is None
