"""KLIP in zones against pyKLIP: each zone's subtraction is ``pyklip.klip.klip_math`` on the
zone's pixels of the target and of the references it may use (a KL-mode cube), its ERR the
deviation of those references' own ``klip_math`` residuals; a reference choice leaves
references out zone by zone, a flagged one everywhere; the reference choice may be made
from the zones' bordered Gram matrices, which hold each target's correlations."""

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from coron_dask.kernels.zones import SPACINGS
from coron_dask.steps.klip import kl_basis, klip, subtract
from coron_dask.steps.klip_parameters import klip_zones
from tests.pyklip_reference import klip_dataset_psfsub, pyklip_inputs, pyklip_zone, relative

SHAPE = (40, 44)
STAR = (20.3, 18.7)
CUTOFFS = (1, 3, 5, 8)
NREF, NSCI = 10, 3
ROWS = 7  # KLIP tiles of 7 rows: 6 tiles, zones cut across them


def _frames(rng, count: int) -> np.ndarray:
    """Float32 frames with a PSF's structure: a core and speckles, each frame a little
    different, and noise."""
    y, x = np.indices(SHAPE, dtype=np.float64)
    r = np.hypot(x - STAR[0], y - STAR[1])
    base = 100 * np.exp(-r / 4) + 5 * np.cos(r / 2.0)
    out = np.empty((count, *SHAPE), np.float32)
    for k in range(count):
        speckles = rng.normal(0, 1.0, 6)
        field = sum(
            a * np.cos((i + 1) * np.arctan2(y - STAR[1], x - STAR[0]) + r / (i + 2))
            for i, a in enumerate(speckles)
        )
        out[k] = base * rng.uniform(0.9, 1.1) + field + rng.normal(0, 0.3, SHAPE)
    return out


@pytest.fixture(scope="module")
def data():
    """Targets (m, y, x) and references aligned to each (m, p, y, x), float32."""
    rng = np.random.default_rng(26)
    targets = _frames(rng, NSCI)
    refs = np.stack([_frames(rng, NREF) for _ in range(NSCI)])
    return targets, refs


def datasets(targets: np.ndarray, refs: np.ndarray) -> tuple[xr.Dataset, xr.Dataset]:
    """The science and psfalign as klip takes them: targets in blocks of 2, references in
    blocks of 4 along the reference axis (3-D psfalign: ``align_to="first"``)."""
    dims = ("integration", "psf", "y", "x")[-refs.ndim :]
    chunks = (2, 4, -1, -1)[-refs.ndim :]
    science = xr.Dataset(
        {
            "sci": (("integration", "y", "x"), da.from_array(targets, chunks=(2, -1, -1))),
            "dq": (("integration", "y", "x"), np.zeros(targets.shape, np.uint32)),
        },
        coords={"integration": np.arange(1, len(targets) + 1)},
    )
    return science, xr.Dataset({"sci": (dims, da.from_array(refs, chunks=chunks))})


def check_zones(psfsub, zones, targets, refs_of, cutoffs=CUTOFFS, err=True) -> float:
    """Every zone of every target against pyKLIP (``refs_of(i, z)``: the references target
    i may use in zone z); pixels in no zone NaN; the worst relative difference."""
    sci, error = psfsub["sci"].values, psfsub["err"].values
    worst = 0.0
    for i in range(len(targets)):
        for z in range(zones.count):
            inside = zones.labels == z
            if not inside.any():
                continue
            expected, spread = pyklip_zone(targets[i], refs_of(i, z), zones.labels, z, cutoffs)
            worst = max(worst, relative(sci[:, i, inside], expected))
            if err:
                below = [c for c, k in enumerate(cutoffs) if k < len(refs_of(i, z))]
                worst = max(worst, relative(error[below][:, i, inside], spread[below]))
    outside = zones.labels < 0
    assert np.isnan(sci[:, :, outside]).all() and np.isnan(error[:, :, outside]).all()
    assert np.isfinite(sci[:, :, ~outside]).all()
    return worst


@pytest.mark.parametrize("spacing", SPACINGS)
def test_each_zone_is_pyklips_klip_math(spacing, data):
    """3 annuli × 4 subsections between an IWA and an OWA, a basis per integration, a
    KL-mode cube: each zone's psfsub and ERR are pyKLIP's on that zone's pixels."""
    targets, refs = data
    zones = klip_zones(
        SHAPE, STAR, annuli=3, subsections=4, annuli_spacing=spacing, iwa=2.5, owa=19.0
    )
    science, psfalign = datasets(targets, refs)
    with dask.config.set(scheduler="synchronous"):
        psfsub = klip(science, psfalign, CUTOFFS, rows=ROWS, zones=zones).compute()
    assert check_zones(psfsub, zones, targets, lambda i, z: refs[i]) < 1e-6


def test_one_basis_per_zone_for_a_3d_psfalign(data):
    """``align_to="first"``: one set of references for every integration, its bases made
    once per zone (no OWA: the last annulus reaches the frame's height)."""
    targets, refs = data
    zones = klip_zones(SHAPE, STAR, annuli=2, subsections=3, annuli_spacing="log", iwa=1.0)
    science, psfalign = datasets(targets, refs[0])
    with dask.config.set(scheduler="synchronous"):
        basis = kl_basis(science, psfalign, CUTOFFS, rows=ROWS, zones=zones)
        assert basis.gram.shape == (1, 6, NREF, NREF)  # one Gram matrix per zone
        psfsub = subtract(science, basis).compute()
    assert check_zones(psfsub, zones, targets, lambda i, z: refs[0]) < 1e-6


@pytest.mark.parametrize("shared", [False, True], ids=["each", "first"])
def test_references_not_chosen_or_flagged_are_left_out(shared, data):
    """A reference choice (m, Z, p) leaves references out zone by zone, of the basis and of
    the ERR; a flagged reference (NaN: its fit did not converge) is left out everywhere,
    as pyKLIP would have it had it not been given."""
    targets, refs = data
    refs = refs[0].copy() if shared else refs.copy()
    if not shared:
        refs[1, 4] = np.nan  # flagged for target 1
    zones = klip_zones(SHAPE, STAR, annuli=2, subsections=2, iwa=2.0, owa=20.0)
    rng = np.random.default_rng(4)
    chosen = rng.random((NSCI, zones.count, NREF)) < 0.7
    chosen[..., :4] = True  # at least four in each zone

    def refs_of(i: int, z: int) -> np.ndarray:
        frames = refs if shared else refs[i]
        used = chosen[i, z] & np.isfinite(frames).all(axis=(1, 2))
        return frames[used]

    science, psfalign = datasets(targets, refs)
    mask = da.from_array(chosen, chunks=(1, -1, -1))
    with dask.config.set(scheduler="synchronous"):
        psfsub = klip(science, psfalign, CUTOFFS, rows=ROWS, zones=zones, chosen=mask).compute()
    assert check_zones(psfsub, zones, targets, refs_of) < 1e-6


def test_references_chosen_from_the_gram_matrices_are_the_most_correlated(data):
    """The reference choice as a function of the bordered Gram matrices (m, Z, p, p + 1):
    the K references of largest overlap / sqrt(G_rr) are those most correlated with the
    target on the zone's pixels (pyKLIP's PSFLibrary choice), and the psfsub is pyKLIP's
    on them."""
    targets, refs = data
    zones = klip_zones(SHAPE, STAR, annuli=2, subsections=4, iwa=2.0, owa=20.0)
    kept = 5

    def most_correlated(gram: da.Array) -> da.Array:
        p = gram.shape[2]
        score = gram[..., p] / da.sqrt(da.diagonal(gram[..., :p], axis1=2, axis2=3))
        rank = da.map_blocks(lambda s: np.argsort(np.argsort(-s, axis=-1), axis=-1), score)
        return rank < kept

    science, psfalign = datasets(targets, refs)
    with dask.config.set(scheduler="synchronous"):
        basis = kl_basis(
            science, psfalign, (1, 3, 5), rows=ROWS, zones=zones, chosen=most_correlated
        )
        psfsub = subtract(science, basis).compute()
        chosen = basis.chosen.compute()
    assert chosen.shape == (NSCI, zones.count, NREF) and (chosen.sum(axis=-1) == kept).all()

    def refs_of(i: int, z: int) -> np.ndarray:
        inside = zones.labels == z
        correlations = [np.corrcoef(targets[i][inside], ref[inside])[0, 1] for ref in refs[i]]
        expected = np.argsort(correlations)[-kept:]
        np.testing.assert_array_equal(np.flatnonzero(chosen[i, z]), np.sort(expected))
        return refs[i][np.sort(expected)]

    assert check_zones(psfsub, zones, targets, refs_of, (1, 3, 5)) < 1e-6


def test_a_reduction_in_zones_is_pyklips_klip_dataset(asn, tmp_path):
    """The simulated observation's first exposure reduced with references aligned to its
    first integration (``align_to="first"``: one library for every integration, as pyKLIP's
    RDI has it) in 3 annuli × 4 subsections between an IWA and an OWA, a KL-mode cube:
    pyKLIP's ``klip_dataset`` (mode RDI, a PSFLibrary of the same aligned references, all of
    them used: ``maxnumbasis``, not derotated) gives the same psfsub, NaN where ours is."""

    from coron_dask.pipeline.build import exposure_zones
    from coron_dask.pipeline.observation import open_association
    from coron_dask.steps.align_refs import align_refs

    observation = open_association(asn, integrations=2)
    science = observation.science[0]
    psfalign, filled = align_refs(science, observation.psfstack, align_to="first")
    p = dict(annuli=3, subsections=4, annuli_spacing="constant", iwa=4.0, owa=30.0)
    zones = exposure_zones(science, p)  # the star through the WCS, as the pipeline finds it
    numbasis = [1, 3, 5]
    with dask.config.set(scheduler="synchronous"):
        ours = klip(filled, psfalign, numbasis, zones=zones)["sci"].values
        frames = filled["sci"].values.astype(np.float64)
        refs = psfalign["sci"].values.astype(np.float64)
    npsf = len(refs)
    dataset, library = pyklip_inputs(frames, refs, zones.star, p)
    theirs = klip_dataset_psfsub(
        dataset,
        tmp_path,
        p,
        numbasis,
        mode="RDI",
        fileprefix="zones",
        maxnumbasis=npsf,
        psf_library=library,
    )
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs)
    assert finite.sum() > 0.5 * finite.size
    assert relative(ours[finite], theirs[finite]) < 1e-6  # 2.5e-8 measured; 1e-3 asked
    np.testing.assert_allclose(
        ours[finite], theirs[finite], rtol=1e-3, atol=1e-6 * np.abs(theirs[finite]).max()
    )
