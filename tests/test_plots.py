"""coron-dask plot: the quicklook PNGs of a run's products exist, are not blank where the
data are drawn, circle the candidates where they are, and point north and east the right
way; bad folders get one line and exit code 2."""

import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from matplotlib.image import imread

from coron_dask import run_coron3
from coron_dask.io import open_product
from coron_dask.quicklook import drawing, figures, reading
from coron_dask.science import geometry
from tests.conftest import run_main

SYNCHRONOUS = {"scheduler": "synchronous", "progress": False}
SCIENCE = ("jw01386001001_03106_00001_nrcalong_c1000", "jw01386001001_03106_00002_nrcalong_c1000")
PRODUCT = "jw01386-c1000_t001_nircam_f410m-maskrnd-sub64"
EXPECTED = sorted(
    [f"{e}_psfsub_mean.png" for e in SCIENCE]
    + [f"{e}_shifts.png" for e in SCIENCE]
    + [f"{PRODUCT}_i2d.png", f"{PRODUCT}_snr.png"]
)


@pytest.fixture(scope="module")
def runs(asn, tmp_path_factory):
    """The products of the small observation: jwst's layout (KL 4) and a KL cube (2, 4)."""
    folders = {}
    for name, truncate in (("single", 4), ("cube", (2, 4))):
        folders[name] = tmp_path_factory.mktemp(name)
        run_coron3(
            asn,
            folders[name],
            psfmask=asn.parent / "psfmask.fits",
            truncate=truncate,
            **SYNCHRONOUS,
        )
    return folders


def plot(capsys, outdir, folder=None) -> list:
    """``coron-dask plot`` in this process: the PNGs it printed, checked to exist."""
    args = ["plot", outdir] + ([] if folder is None else ["-o", folder])
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    paths = [line for line in out.splitlines() if line]
    assert all(path.endswith(".png") for path in paths)
    return paths


def rgb(path) -> np.ndarray:
    return imread(path)[..., :3]


def crop(image: np.ndarray, rows: tuple, columns: tuple) -> np.ndarray:
    """The part of ``image`` between fractions of its height and width."""
    height, width = image.shape[:2]
    return image[
        int(rows[0] * height) : int(rows[1] * height),
        int(columns[0] * width) : int(columns[1] * width),
    ]


def assert_drawn(area: np.ndarray, colours: int = 100) -> None:
    """An image drawn from data: a real spread of values and many distinct colours (a blank
    or constant image gives one colour and no spread)."""
    distinct = len(np.unique(area.reshape(-1, 3), axis=0))
    assert area.std() > 0.08 and distinct > colours, (area.std(), distinct)


#: Where the image panels' data lie (fractions of height and width), one box per panel.
PANELS = {
    "i2d": {1: [((0.3, 0.7), (0.25, 0.6))]},
    "mean": {
        1: [((0.4, 0.7), (0.38, 0.52))],
        2: [((0.4, 0.7), (0.15, 0.28)), ((0.4, 0.7), (0.64, 0.77))],
    },
    "snr": {
        1: [((0.35, 0.7), (0.38, 0.56))],
        2: [((0.35, 0.7), (0.16, 0.3)), ((0.35, 0.7), (0.66, 0.8))],
    },
}


def assert_figures_drawn(folder, planes: int) -> None:
    """Every image panel of every PNG of a run shows data; the shifts figures a line per
    reference (blue) and the mean (black) in each of their three panels."""
    for path in sorted(folder.glob("*.png")):
        image = rgb(path)
        kind = path.stem.rsplit("_", 1)[-1]
        if kind == "shifts":
            for top in (0.06, 0.36, 0.66):
                area = crop(image, (top, top + 0.26), (0.2, 0.88))
                blue = area[..., 2] - area[..., 0] > 0.15  # C0, translucent
                black = np.all(area < 0.15, axis=-1)
                assert blue.sum() > 50 and black.sum() > 50, path.name
            continue
        for rows, columns in PANELS[kind][1 if kind == "i2d" else planes]:
            assert_drawn(crop(image, rows, columns))


def test_plot_writes_the_quicklook_of_a_run(runs, capsys, tmp_path):
    single = plot(capsys, runs["single"], tmp_path / "single")
    assert sorted(p.rsplit("/", 1)[-1] for p in single) == EXPECTED
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == EXPECTED  # no partial
    assert_figures_drawn(tmp_path / "single", planes=1)
    cube = plot(capsys, runs["cube"], tmp_path / "cube")
    assert sorted(p.rsplit("/", 1)[-1] for p in cube) == EXPECTED
    assert_figures_drawn(tmp_path / "cube", planes=2)
    # one panel per KL cutoff: the cube's figures are wider
    for name in (f"{SCIENCE[0]}_psfsub_mean.png", f"{PRODUCT}_snr.png"):
        ratio = rgb(tmp_path / "cube" / name).shape[1] / rgb(tmp_path / "single" / name).shape[1]
        assert ratio > 1.2, name


#: ADI+RDI in 6 zones between 3 and 25 px, the 6 most correlated of 9 references chosen.
ADI = dict(mode="ADI+RDI", movement=1.0, annuli=3, subsections=2, iwa=3.0, owa=25.0)
ADI.update(maxnumbasis=6, truncate=(2, 4))


@pytest.fixture(scope="module")
def adi_run(asn, tmp_path_factory):
    """The products of the small observation reduced with ADI+RDI in zones, references
    chosen (``ADI``)."""
    folder = tmp_path_factory.mktemp("adi")
    run_coron3(asn, folder, psfmask=asn.parent / "psfmask.fits", **ADI, **SYNCHRONOUS)
    return folder


def test_adi_quicklook_tells_the_references_and_zones_apart(adi_run, runs, capsys, tmp_path):
    """ADI+RDI in zones with references chosen: the shifts figure draws the other roll's
    integrations apart from the reference star's frames (orange, their own mean), as
    psfalign's KIND says; the psfsub figure draws no zone's pixels as no data (grey, not
    the white of zero) and says, in lines under its title, the mode, the zones and the
    choice of references, as the headers, REFS, REFCORR and KIND read by astropy give
    them."""
    paths = plot(capsys, adi_run, tmp_path / "adi")
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == EXPECTED
    (tmp_path / "cube").mkdir()
    for exposure in SCIENCE:
        with fits.open(adi_run / f"{exposure}_psfalign.fits") as hdul:
            table = hdul["ALIGN"].data
            npsf = hdul["SCI"].data.shape[1]
        kinds = np.char.strip(table["KIND"].astype(str))
        assert list(kinds[:npsf]) == ["RDI"] * 6 + ["ADI"] * 3
        record = reading.read_alignment(adi_run / f"{exposure}_psfalign.fits")
        assert list(record["KIND"]) == list(kinds)
        opened = open_product(adi_run / f"{exposure}_psfalign.fits")
        assert list(opened["psf_kind"].values) == list(kinds[:npsf])
        np.testing.assert_array_equal(opened["psf_roll"].values, table["ROLL"][:npsf])
        cube = runs["cube"] / f"{exposure}_psfsub.fits"  # RDI, the whole frame
        figures.shifts_figure(
            reading.read_alignment(cube), exposure, tmp_path / "cube" / f"{exposure}_shifts.png"
        )
        figures.psfsub_figure(cube, tmp_path / "cube" / f"{exposure}_psfsub_mean.png")
        for folder, orange in (("adi", True), ("cube", False)):
            image = rgb(tmp_path / folder / f"{exposure}_shifts.png")
            c1 = (image[..., 0] - image[..., 2] > 0.5) & (image[..., 1] > 0.35)
            assert (c1.sum() > 50) == orange, (folder, c1.sum())
        psfsub = adi_run / f"{exposure}_psfsub.fits"
        with fits.open(psfsub) as hdul:
            refs, correlation = hdul["REFS"].data, hdul["REFCORR"].data
            header = hdul[0].header
            outside = np.isnan(hdul["SCI"].data).all(axis=(0, 1))
        assert (header["KLIPMODE"], header["MAXNBAS"]) == ("ADI+RDI", 6)
        share = np.mean(kinds[:npsf][refs[refs >= 0]] == "RDI")
        choice = reading.read_choice(psfsub)
        assert figures.reduction_lines(dict(header), choice) == [
            "KLIP: ADI+RDI (movement 1 px), 6 zones (3 annuli × 2 subsections) from 3 px to "
            "25 px (grey: not reduced)",
            "references: the 6 most correlated of 9 per integration and zone (REFS), "
            f"correlation {correlation[refs >= 0].min():.3f} to "
            f"{correlation[refs >= 0].max():.3f}; {share:.0%} of the choices the reference "
            "star's frames",
        ]
        mean = rgb(tmp_path / "adi" / f"{exposure}_psfsub_mean.png")
        grey = np.all(np.abs(mean - 0.75) < 0.02, axis=-1)
        alone = rgb(tmp_path / "cube" / f"{exposure}_psfsub_mean.png")
        # no zone beyond 25 px nor within 3: about 40 % of each panel's pixels
        assert outside.mean() > 0.3 and grey.mean() > 0.1 * outside.mean() * 2
        assert np.all(np.abs(alone - 0.75) < 0.02, axis=-1).mean() < 0.01
        with fits.open(cube) as hdul:
            assert figures.reduction_lines(dict(hdul[0].header), None) == [
                "KLIP: RDI, one zone, the whole frame"
            ]


def test_plot_writes_beside_the_products_by_default_and_redraws_the_contrast(
    runs, capsys, tmp_path
):
    folder = tmp_path / "products"
    shutil.copytree(runs["single"], folder)
    curve = Table(
        {
            "kl": [4] * 5,
            "separation": np.linspace(0.3, 1.5, 5),
            "contrast": np.geomspace(1e-3, 1e-5, 5),
        },
        meta={"resolution_pixels": 2.1, "pixel_scale_arcsec": 0.063},
    )
    curve.write(folder / f"{PRODUCT}_contrast.ecsv")
    paths = plot(capsys, folder)
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == sorted(
        [*EXPECTED, f"{PRODUCT}_contrast.png"]
    )
    assert all(p.startswith(str(folder)) for p in paths)
    line = rgb(folder / f"{PRODUCT}_contrast.png")
    blue = np.all(np.abs(line - [0.12, 0.47, 0.71]) < 0.2, axis=-1)  # the curve, C0
    assert blue.sum() > 200


def test_zarr_products_plot_as_fits_do(asn, capsys, tmp_path):
    run_coron3(
        asn,
        tmp_path / "zarr",
        psfmask=asn.parent / "psfmask.fits",
        truncate=(2, 4),
        format="zarr",
        **SYNCHRONOUS,
    )
    assert list((tmp_path / "zarr").glob("*_i2d.zarr"))
    paths = plot(capsys, tmp_path / "zarr", tmp_path / "png")
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == EXPECTED
    assert_figures_drawn(tmp_path / "png", planes=2)


def detection_folder(source, target, candidates=None):
    """``target`` with the i2d and detection map of ``source``, and ``candidates`` (rows of
    x, y, significance[, kl]) as their candidates table, if any."""
    target.mkdir()
    for name in (f"{PRODUCT}_i2d.fits", f"{PRODUCT}_snr.fits"):
        shutil.copy(source / name, target / name)
    if candidates is not None:
        names = ["x", "y", "significance", "kl"][: len(candidates[0])]
        table = Table(rows=candidates, names=names, meta={"resolution_pixels": 2.5})
        table.write(target / f"{PRODUCT}_candidates.ecsv")
    return target


def difference(a, b) -> np.ndarray:
    """Where two PNGs of the same size differ."""
    a, b = rgb(a), rgb(b)
    assert a.shape == b.shape
    return np.any(np.abs(a - b) > 0.02, axis=-1)


def test_a_candidate_is_circled_where_it_is(runs, capsys, tmp_path):
    """The same detection map without a candidate, and with one near the upper left or the
    lower right: the drawing changes, in a small area, which moves with the candidate."""
    places = {"none": None, "upper_left": [(15.0, 55.0, 7.5)], "lower_right": [(55.0, 15.0, 7.5)]}
    for name, rows in places.items():
        plot(capsys, detection_folder(runs["single"], tmp_path / name, rows))
    centres = {}
    for name in ("upper_left", "lower_right"):
        changed = difference(
            tmp_path / "none" / f"{PRODUCT}_snr.png", tmp_path / name / f"{PRODUCT}_snr.png"
        )
        assert 30 < changed.sum() < 0.05 * changed.size  # a circle and its label
        centres[name] = np.argwhere(changed).mean(axis=0) / changed.shape  # (row, column)
        i2d = difference(
            tmp_path / "none" / f"{PRODUCT}_i2d.png", tmp_path / name / f"{PRODUCT}_i2d.png"
        )
        assert i2d.sum() > 30
    # higher y is higher in the picture (a smaller row), higher x further right
    assert centres["upper_left"][0] < centres["lower_right"][0] - 0.2
    assert centres["upper_left"][1] < centres["lower_right"][1] - 0.2


def test_each_kl_cutoff_shows_its_own_candidates(runs, capsys, tmp_path):
    """In a KL cube, a candidate of cutoff 2 is circled in the first panel of the detection
    map and not on the i2d (which shows cutoff 4, the largest); one of cutoff 4 in the
    second panel and on the i2d."""
    plot(capsys, detection_folder(runs["cube"], tmp_path / "none", [(30.0, 20.0, 6.0, 9)]))
    for cutoff in (2, 4):
        plot(
            capsys,
            detection_folder(runs["cube"], tmp_path / f"kl{cutoff}", [(30.0, 20.0, 6.0, cutoff)]),
        )
    none, kl2, kl4 = (tmp_path / n for n in ("none", "kl2", "kl4"))
    assert not difference(none / f"{PRODUCT}_i2d.png", kl2 / f"{PRODUCT}_i2d.png").any()
    assert difference(none / f"{PRODUCT}_i2d.png", kl4 / f"{PRODUCT}_i2d.png").sum() > 30
    for folder, side in ((kl2, 0), (kl4, 1)):
        changed = difference(none / f"{PRODUCT}_snr.png", folder / f"{PRODUCT}_snr.png")
        columns = np.argwhere(changed)[:, 1] / changed.shape[1]
        assert changed.sum() > 30 and np.all((columns > 0.5) == bool(side))


def test_empty_or_missing_folder_is_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no products here")
    for folder, problem in (
        (tmp_path / "empty", "no coron-dask product"),
        (tmp_path / "missing", "no such folder"),
    ):
        code, out, err = run_main(["plot", folder], capsys)
        assert code == 2 and out == ""
        assert err.count("\n") == 1
        assert err.startswith(f"coron-dask: error: {folder}: {problem}")
    assert not list((tmp_path / "empty").glob("*.png"))


@pytest.mark.parametrize("kind", ["i2d", "contrast"])
def test_an_unreadable_product_is_named(kind, capsys, tmp_path):
    if kind == "i2d":
        broken, problem = tmp_path / f"{PRODUCT}_i2d.fits", "cannot read its SCI"
        broken.write_bytes(b"\0" * 4000)
    else:
        broken, problem = tmp_path / f"{PRODUCT}_contrast.ecsv", "not a contrast curve: no"
        Table({"kl": [4], "separation": [1.0]}).write(broken)
    code, _, err = run_main(["plot", tmp_path], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"coron-dask: error: {broken}: {problem}")


def test_mean_over_integrations_leaves_missing_pixels_out(tmp_path):
    rng = np.random.default_rng(3)
    sci = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # (kl, integration, y, x)
    sci[:, 1, 0, 0] = np.nan  # one integration missing: the mean of the other two
    sci[:, :, 2, 3] = np.nan  # missing in all: no data
    hdu = fits.ImageHDU(sci, name="SCI")
    hdu.header["KLMODE0"], hdu.header["KLMODE1"] = 5, 10
    path = tmp_path / "x_psfsub.fits"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    image = reading.read_image(path, "SCI")
    assert image.cutoffs == [5, 10]
    means = reading.mean_over_integrations(image)
    expected = sci.astype(np.float64).mean(axis=1)
    expected[:, 0, 0] = sci[:, [0, 2], 0, 0].astype(np.float64).mean(axis=1)
    expected[:, 2, 3] = np.nan
    np.testing.assert_allclose(means, expected, rtol=1e-12, equal_nan=True)


def sky_grid(angle_deg: float, east_left: bool = True) -> WCS:
    """A TAN grid whose north is ``angle_deg`` clockwise from +y, east left of north (as
    the sky is seen) or mirrored."""
    grid = WCS(naxis=2)
    grid.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    grid.wcs.crval = [80.0, -30.0]
    grid.wcs.crpix = [50.0, 50.0]
    scale = 0.063 / 3600
    grid.wcs.cdelt = [-scale if east_left else scale, scale]
    a = np.radians(angle_deg)
    grid.wcs.pc = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return grid


@pytest.mark.parametrize("east_left", [True, False])
@pytest.mark.parametrize("angle", [0.0, 30.0, 110.0, 200.0, 290.0])
def test_the_compass_points_north_and_east(angle, east_left):
    """At the reference pixel, north is where the CD matrix sends (ξ, η) = (0, 1), east
    where it sends (1, 0): inverted, those give the pixel directions."""
    grid = sky_grid(angle, east_left)
    north, east = geometry.compass(grid, 49.0, 49.0)  # 0-based: CRPIX 50
    a = np.radians(angle)
    assert north == pytest.approx([np.sin(a), np.cos(a)], abs=1e-6)  # clockwise by angle
    inverse = np.linalg.inv(grid.wcs.get_pc() * grid.wcs.cdelt[:, None])
    for vector, expected in ((north, inverse @ [0, 1]), (east, inverse @ [1, 0])):
        assert vector == pytest.approx(expected / np.hypot(*expected), abs=1e-6)
    # east is 90° anticlockwise of north on the sky as seen, clockwise mirrored
    turn = north[0] * east[1] - north[1] * east[0]
    assert turn == pytest.approx(1.0 if east_left else -1.0, abs=1e-6)


def test_scale_bar_and_colour_limits():
    assert [drawing.nice_length(v) for v in (0.47, 1.0, 1.19, 4.99, 5.0, 12.0, 0.0031)] == [
        0.2,
        1.0,
        1.0,
        2.0,
        5.0,
        10.0,
        0.002,
    ]
    assert drawing.asinh_ticks(1.5e-3, 3e-6) == pytest.approx(
        [-1e-3, -1e-4, -1e-5, 0.0, 1e-5, 1e-4, 1e-3]
    )
    assert drawing.asinh_ticks(1.5e-3, 1e-4) == pytest.approx([-1e-3, 0.0, 1e-3])
    values = np.concatenate([np.linspace(-1, 1, 1995), [50, -80, 90, np.nan, 70, 60]])
    assert drawing.symmetric_limit(values) == pytest.approx(1.0, abs=0.02)  # outliers clipped
    assert drawing.symmetric_limit(np.zeros(10)) == 1.0
    assert drawing.symmetric_limit(np.full(3, np.nan)) == 1.0
