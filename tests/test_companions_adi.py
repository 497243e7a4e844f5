"""Companions fitted in ADI and ADI+RDI reductions by negative injection, the bases rebuilt
(``kernels.negative_injection``, ``science.companion_adi``): the kernel is KLIP redone on
frames with the companion taken out; the model on the pixels of a reduction is the
pipeline's own negative injection (``injected_psfsubs``, which rebuilds the ADI bases from
whole frames), for a basis per exposure and per integration, in zones and over the frame;
a companion simulated with a known place and contrast is recovered within its
uncertainties with ADI+RDI, and agrees with the RDI fit of the same data."""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from coron_dask.io import Extension, Product, write_products
from coron_dask.kernels import klip
from coron_dask.kernels.negative_injection import adi_residuals
from coron_dask.pipeline.build import reduce_observation
from coron_dask.pipeline.companions import Guess, measure_companions, read_windows, windows_product
from coron_dask.science.companion_adi import AdiCompanionModel
from coron_dask.science.companion_fit import FitSettings
from coron_dask.science.geometry import pixel_positions, star_position
from coron_dask.science.injection import Companion, injected_psfsubs, read_offaxis_psf
from coron_dask.science.photometry import snr_map
from coron_dask.science.simulate import simulate, truth_places
from tests.conftest import BLANK
from tests.test_companions import centroid_truth


def _brute_force(refs, target, labels, used, adi, taken_ref, taken_sci, cutoff):
    """KLIP of ``target`` − ``taken_sci`` on the references with ``taken_ref`` taken out of
    the ``adi`` rows, every zone's basis made again from its pixels (``kernels.klip``)."""
    refs = refs.copy()
    refs[adi] -= taken_ref
    target = target - taken_sci
    out = np.full(target.shape, np.nan)
    for zone in np.unique(labels[labels >= 0]):
        pixels = labels == zone
        kept = refs[used[zone]][:, pixels]
        kept = kept - kept.mean(axis=1, keepdims=True)
        centred = target[pixels] - target[pixels].mean()
        weights = klip.kl_weights(kept @ kept.T, int(pixels.sum()), cutoff)[0]
        images = weights.T @ kept
        out[pixels] = centred - (images @ centred) @ images
    return out


@pytest.mark.parametrize("zones,cutoff", [(1, 2), (1, 4), (3, 2), (3, 4), (3, 50)])
def test_kernel_is_klip_redone_with_the_companion_taken_out(zones, cutoff):
    """On random frames in 1 or 3 zones (the companion's pixels U across them, a
    reference left out of one zone; cutoffs on either side of ``SUBSET_BELOW``, and
    above the references): the kernel's residual
    equals KLIP redone on the whole frames to 1e-12 of its largest value."""
    rng = np.random.default_rng(zones + cutoff)
    p, npix, n = 14, 600, 3
    labels = np.repeat(np.arange(zones), npix // zones)
    labels[:7] = -1  # pixels in no zone
    refs = rng.normal(size=(p, npix)) + 3 * rng.normal(size=npix)
    target = rng.normal(size=npix) + 0.5 * refs[0]
    adi = np.array([9, 10, 11, 12, 13])
    used = np.ones((zones, p), bool)
    used[-1, 3] = used[0, 11] = False
    pixels = np.arange(150, 480)  # U
    taken_ref = np.zeros((n, len(adi), npix))
    taken_ref[:, :, pixels] = rng.normal(size=(n, len(adi), len(pixels)))
    taken_sci = np.zeros((n, npix))
    taken_sci[:, pixels] = rng.normal(size=(n, len(pixels)))
    centred, centred_target = np.zeros((p, npix)), np.zeros(npix)
    gram, overlaps = np.zeros((1, zones, p, p)), np.zeros((1, zones, p))
    for zone in range(zones):
        inside = labels == zone
        centred[:, inside] = refs[:, inside] - refs[:, inside].mean(axis=1, keepdims=True)
        centred_target[inside] = target[inside] - target[inside].mean()
        gram[0, zone] = centred[:, inside] @ centred[:, inside].T
        overlaps[0, zone] = centred[:, inside] @ centred_target[inside]
    stamp_pixels = np.arange(200, 420)
    residual = adi_residuals(
        centred[None][..., pixels],
        centred_target[None][:, pixels],
        gram,
        overlaps,
        used[None],
        np.bincount(labels[labels >= 0]),
        labels[pixels],
        adi,
        taken_sci[:, pixels],
        taken_ref[:, None][..., pixels],
        np.searchsorted(pixels, stamp_pixels),
        cutoff,
    )
    for k in range(n):
        expected = _brute_force(
            refs, target, labels, used, adi, taken_ref[k], taken_sci[k], cutoff
        )[stamp_pixels]
        assert np.abs(residual[k, 0] - expected).max() < 1e-12 * np.abs(expected).max()
    assert not np.allclose(residual[0, 0], residual[1, 0])  # the companion matters


#: (name, reduce_observation's parameters): ADI+RDI, one basis per exposure in zones;
#: ADI alone, a basis per integration over the frame
REDUCTIONS = {
    "adi+rdi-first-zones": dict(
        mode="ADI+RDI", align_to="first", annuli=3, subsections=2, iwa=3.0, movement=1.0
    ),
    "adi-each": dict(mode="ADI", align_to="each", movement=1.0),
}


def _without_bad_pixels(folder: Path, copy: Path) -> Path:
    """A copy of a simulated observation with no pixel to fill (DQ 0, NaN pixels set to
    0): align_refs' fill, the one step the model leaves out, is then the identity."""
    shutil.copytree(folder, copy)
    for path in copy.glob("*_cal*.fits"):
        with fits.open(path, mode="update") as hdul:
            hdul["SCI"].data = np.nan_to_num(hdul["SCI"].data)
            hdul["DQ"].data[...] = 0
    return copy


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_model_is_the_pipelines_negative_injection(name, observation_dir, tmp_path):
    """The model's residual on the companion's window, for the companion taken out at its
    start, equals the pipeline's own reduction of the frames with it taken out
    (``injected_psfsubs`` with the contrast negated: whole frames, aligned by the fitted
    shifts, every ADI basis made again), integration-mean, to 2e-5 of the companion's
    peak (float32's rounding of the psfsub: 6e-6 measured), on an observation with no
    pixel to fill. The fill is the one step the model leaves out: with the simulation's
    bad pixels and outlier flags it moves the residual by 5e-4 of the peak through the
    bases and 1.1e-3 at a filled pixel, which the fit leaves out of its stamp (``BAD``).
    The residual differs from the data by the companion. The PSF is tapered to 0 at its
    box's edges: the pipeline shifts the ADI references' companions with their whole
    frames, where a cut box would ring (1e-3 of the peak beyond the box)."""
    observation_dir = _without_bad_pixels(observation_dir, tmp_path / "observation")
    asn = next(observation_dir.glob("*_asn.json"))
    psf = read_offaxis_psf(observation_dir / "offaxis_psf.fits")[20:-20, 20:-20]
    taper = np.hanning(psf.shape[0] + 2)[1:-1]
    psf *= np.outer(taper, taper)  # no edge: whole-frame shifts of its box do not ring
    reduction = reduce_observation(
        asn,
        tmp_path,
        psfmask=observation_dir / "psfmask.fits",
        truncate=(3, 6),
        save_psfalign=False,
        integrations=2,
        skip=("outlier_detection",),  # its flags would be filled
        **REDUCTIONS[name],
    )
    settings = FitSettings.configured()
    guess = Guess(0.8, 30.0)
    contrast = 2e-4
    product = windows_product(reduction, [guess], psf, 2.0, settings, tmp_path, "adi")
    star = star_position(reduction.science[0].attrs, asn)
    subs, _ = injected_psfsubs(reduction, psf, [Companion(0, 0.8, 30.0, -contrast)], star)
    injected = Product(
        tmp_path / "injected.fits",
        {},
        [Extension(f"INJ{k}", sub["sci"].data[-1].mean(axis=0)) for k, sub in enumerate(subs)],
    )  # computed with the reduction: its scratch files are gone after
    write_products([*reduction.products, product, injected], None)
    means = [fits.getdata(injected.path, f"INJ{k}") for k in range(len(subs))]
    rolls_of, _, about = read_windows(product.path)
    model = AdiCompanionModel(
        rolls_of[0], psf, about["star"], (0.8, 30.0), cutoff=6, half=None,
        **{k: v for k, v in settings.in_pixels(2.0).items() if k != "half"},
    )  # fmt: skip
    theta = np.array([[0.8, 30.0, contrast]])
    peak = contrast * psf.max()
    for k, (roll, mean) in enumerate(zip(model.rolls, means, strict=True)):
        expected = np.asarray(mean, dtype=np.float64)
        (y0, x0), shape = roll.corner, roll.labels.shape
        inside = np.flatnonzero((roll.labels >= 0).ravel() & ~roll.bad.ravel())
        residual = model.residuals(theta, k, roll.adi.index(roll.corner, shape, inside))[0]
        yy, xx = np.divmod(inside, shape[1])
        wanted = expected[yy + y0, xx + x0]
        assert np.isfinite(residual).all() and np.isfinite(wanted).all()
        assert np.abs(residual - wanted).max() < 2e-5 * peak, np.abs(residual - wanted).max() / peak
        data = roll.image[yy + y0, xx + x0]
        assert np.abs(data - wanted).max() > 0.3 * peak


#: shorter chains than the default 50 τ (the benchmark runs those): the test's time
SHORT = dict(tau_factor=25, check_steps=250)


@pytest.fixture(scope="module")
def recovered_adi(tmp_path_factory) -> list:
    """A companion simulated at about 40σ, two rolls 10° apart, reduced with ADI+RDI and
    with RDI (5 annuli, a basis per exposure) and fitted from a start 0.5 px off: per
    case (ADI+RDI fit, RDI fit, truth separation, PA, contrast, and the ADI+RDI table's
    (i2d S/N, residual i2d S/N))."""
    out = []
    for i, contrast in enumerate((1.5e-5,)):
        folder = tmp_path_factory.mktemp(f"adi{i}")
        observation = {**BLANK, "seed": BLANK["seed"] + 20 + i}
        asn = simulate(folder / "sim", contrast=contrast, companion=(20.0, 8.0), **observation)
        truth = json.loads((folder / "sim" / "truth.json").read_text())
        star, place = truth_places(truth)
        start = (star.separation(place).arcsec + 0.02, star.position_angle(place).deg + 1.0)
        fits_found, residual = {}, {}
        for mode in ("ADI+RDI", "RDI"):
            fits_found[mode], paths = measure_companions(
                asn,
                folder / mode,
                offaxis_psf=folder / "sim" / "offaxis_psf.fits",
                guesses=[Guess(*start)],
                psfmask=folder / "sim" / "psfmask.fits",
                transmission="none",
                settings=FitSettings.configured(**SHORT),
                truncate=10,
                annuli=5,
                iwa=4.0,
                mode=mode,
                align_to="first",
                execution={"scheduler": "synchronous", "progress": False},
            )
            table = Table.read(next(p for p in paths if p.name.endswith("_companions.ecsv")))
            residual[mode] = (float(table["snr_i2d"][0]), float(table["residual_snr"][0]))
        fit = fits_found["ADI+RDI"][0]
        truth_values = (*centroid_truth(folder / "sim", truth, fit), contrast)
        out.append((fit, fits_found["RDI"][0], *truth_values, residual["ADI+RDI"]))
    return out


def test_adi_companion_is_recovered_within_its_uncertainties(recovered_adi):
    """ADI+RDI: the chain converged; separation, PA and contrast within 3σ of the truth;
    the position to better than 0.1 λ/D at these S/N; its residual on the stamp below
    S/N 3; the model says it is negative injection."""
    scale = 0.063
    for fit, _, separation, angle, contrast, _ in recovered_adi:
        assert fit.converged, fit.describe()
        assert "negative injection" in fit.method
        offsets = [
            (fit.separation.median - separation) / fit.separation.sigma,
            ((fit.position_angle.median - angle + 180) % 360 - 180) / fit.position_angle.sigma,
            (fit.contrast.median - contrast) / fit.contrast.sigma,
        ]
        assert np.abs(offsets).max() < 3, (offsets, fit.describe())
        along = fit.separation.sigma / scale
        across = np.radians(fit.position_angle.sigma) * separation / scale
        assert np.hypot(along, across) < 0.1 * 2.0


def test_adi_and_rdi_fits_of_the_same_data_agree(recovered_adi):
    """The same companion fitted in the ADI+RDI and the RDI reduction: within 2 combined σ
    in separation, PA and contrast."""
    for adi, rdi, *_ in recovered_adi:
        for a, r in (
            (adi.separation, rdi.separation),
            (adi.position_angle, rdi.position_angle),
            (adi.contrast, rdi.contrast),
        ):
            assert abs(a.median - r.median) < 2 * np.hypot(a.sigma, r.sigma), (a, r)


def test_walkers_spread_over_workers_give_the_same_chain(observation_dir, tmp_path, caplog):
    """``companions`` with ADI+RDI on a LocalCluster's two workers: each step's walkers are
    evaluated there, a part a task (``runtime.spread``), and the chain is the one the
    same fit makes in this process (``spread-walkers`` false), number for number; the
    workers ran the parts (the scheduler's record)."""
    from distributed import Client, LocalCluster

    asn = next(observation_dir.glob("*_asn.json"))
    common = dict(
        offaxis_psf=observation_dir / "offaxis_psf.fits",
        guesses=[Guess(0.8, 30.0)],
        psfmask=observation_dir / "psfmask.fits",
        transmission="none",
        truncate=4,
        mode="ADI+RDI",
        align_to="first",
        movement=1.0,
    )
    small = dict(walkers=8, check_steps=40, max_steps=80)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        chains = []
        for spread in (True, False):
            with caplog.at_level(logging.INFO, logger="coron_dask"):
                caplog.clear()
                found, _ = measure_companions(
                    asn,
                    tmp_path / str(spread),
                    settings=FitSettings.configured(spread_walkers=spread, **small),
                    execution={"client": client, "progress": False},
                    **common,
                )
            said = "walkers evaluated on the cluster's workers" in caplog.text
            assert said == spread
            chains.append(found[0].samples)
        ran = client.run_on_scheduler(
            lambda dask_scheduler: sum(
                prefix.state_counts["memory"]  # tasks that reached memory, ever
                for name, prefix in dask_scheduler.task_prefixes.items()
                if "log_probability" in name
            )
        )
    assert np.array_equal(chains[0], chains[1])
    assert ran >= 80 * 2  # two parts a step


def test_the_adi_residual_has_no_significant_source(recovered_adi):
    """Each roll's integration-mean psfsub reduced again with the fitted companion taken
    out of every frame (the negative injection at the posterior medians): |S/N| below 3
    within λ/D of the companion (``photometry.snr_map``), where it was above 10."""
    for fit, *_ in recovered_adi:
        rolls = zip(fit.model.rolls, fit.residual_images(), fit.places, strict=True)
        for roll, residual, place in rolls:
            centre = tuple(pixel_positions(roll.wcs, fit.model.star)[0])
            yy, xx = np.indices(residual.shape)
            near = np.hypot(xx - place[0], yy - place[1]) <= 2.0
            before = np.nanmax(snr_map(roll.image, centre, 2.0)[0][near])
            after = np.nanmax(np.abs(snr_map(residual, centre, 2.0)[0][near]))
            assert before > 10 and after < 3, (before, after)


def test_the_adi_residual_i2d_has_no_significant_source(recovered_adi):
    """``<product>_residual_i2d.fits`` of the ADI+RDI fit (every fitted companion taken
    out of the science and of the other roll's integrations, the bases made again, the
    i2d made as the science's): |S/N| < 3 at the companion, where the i2d has > 10."""
    for *_, (before, after) in recovered_adi:
        assert before > 10 and abs(after) < 3, (before, after)
