"""``coron-dask companions``: a simulated companion (truth.json) fitted from the command
line lies within its errors of the truth in ``<product>_companions.ecsv``, its quicklook
is drawn, the table records the run's provenance; bad input is one line, exit 2, nothing
written; the star-position and plate-scale errors widen the astrometry as a Monte Carlo of
those errors does."""

import json
import signal
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from matplotlib.image import imread

from benchmarks.hashes import fingerprints
from coron_dask.pipeline.provenance import read_provenance
from coron_dask.science.companion_result import Estimate
from coron_dask.science.companion_table import widened
from coron_dask.science.photometry import snr_map
from coron_dask.science.simulate import simulate, truth_places
from tests.conftest import BLANK, run_main, start_cli

#: the reduction fitted, as the command line gives it
REDUCTION = ["--transmission", "none", "--truncate", "10", "--annuli", "5", "--iwa", "4"]


@pytest.fixture(scope="module")
def fitted_cli(tmp_path_factory) -> dict:
    """The simulated companion fitted by ``coron-dask companions`` from a start 0.02" and
    1° off, and the same reduction's i2d made by ``coron-dask run``."""
    folder = tmp_path_factory.mktemp("companions_cli")
    asn = simulate(folder / "sim", **BLANK)
    truth = json.loads((folder / "sim" / "truth.json").read_text())
    star, place = truth_places(truth)
    start = f"{star.separation(place).arcsec + 0.02},{star.position_angle(place).deg + 1.0}"
    common = ["--psfmask", folder / "sim" / "psfmask.fits", "--scheduler", "synchronous"]
    return dict(
        folder=folder,
        asn=asn,
        truth=truth,
        star=star,
        place=place,
        args=[
            "companions",
            asn,
            "-o",
            folder / "out",
            "--offaxis-psf",
            folder / "sim" / "offaxis_psf.fits",
            "--at",
            start,
            *REDUCTION,
            *common,
        ],
        run=["run", asn, "-o", folder / "out", *REDUCTION[2:], *common],
    )


@pytest.fixture(scope="module")
def companions_output(fitted_cli) -> dict:
    """What the two commands print and write (run once per module): ``run``, then
    ``companions`` into the folder of the run's products."""
    from coron_dask.cli.main import main

    out = fitted_cli["folder"] / "out"
    assert main([str(a) for a in fitted_cli["run"]]) == 0
    run = {path.name: path.stat() for path in out.iterdir()}
    fingerprint = fingerprints(out)
    code = main([str(a) for a in fitted_cli["args"]])
    assert code == 0
    return dict(
        table=Table.read(next(out.glob("*_companions.ecsv")), format="ascii.ecsv"),
        pngs=sorted(out.glob("*_companion[0-9]*.png")),
        i2d=next(out.glob("*[0-9]_i2d.fits")),
        run_files=run,
        fingerprint=fingerprint,
        **fitted_cli,
    )


def test_the_runs_products_in_the_folder_are_left_as_they_are(companions_output):
    """``companions`` into a run's folder: every product of the run is the same file
    (inode and modification time: not replaced by the command's own i2d, a scratch file
    read and removed) with the same content; besides them only the windows, the table
    and the quicklook, no hidden file."""
    out = companions_output["folder"] / "out"
    for name, stat in companions_output["run_files"].items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    after = fingerprints(out)
    assert {name: after[name] for name in companions_output["fingerprint"]} == companions_output[
        "fingerprint"
    ]
    added = {path.name.rsplit("_", 1)[-1] for path in out.iterdir()} - {
        name.rsplit("_", 1)[-1] for name in companions_output["run_files"]
    }
    assert added == {"fmwindows.fits", "companions.ecsv", "companion1.png"}
    assert len(list(out.glob("*_residual_i2d.fits"))) == 1
    assert not list(out.glob(".*"))  # the scratch files: i2d, crfints, aligned references


def test_the_fitted_row_is_within_its_errors_of_the_truth(companions_output):
    table, star, place = (companions_output[k] for k in ("table", "star", "place"))
    assert len(table) == 1
    row = table[0]
    truth_offsets = star.spherical_offsets_to(place)
    expected = {
        "separation": star.separation(place).arcsec,
        "pa": star.position_angle(place).deg,
        "east": truth_offsets[0].arcsec,
        "north": truth_offsets[1].arcsec,
        "contrast": companions_output["truth"]["contrast"],
    }
    for name, value in expected.items():
        sigma = 0.5 * (row[f"{name}_minus"] + row[f"{name}_plus"])
        assert abs(row[name] - value) < 3 * sigma, (name, row[name], value, sigma)
    assert row["converged"] and row["kl"] == 10 and row["model"] == "exact RDI forward model"
    assert table["flux"].unit == "MJy/sr"  # the calints' BUNIT
    assert row["snr"] > 5
    # the i2d's S/N at the fitted place: the detection map's (photometry.snr_map) there
    with fits.open(companions_output["i2d"]) as hdul:
        image, grid = hdul["SCI"].data.astype(float), WCS(hdul["SCI"].header, naxis=2)
    star_px = [float(v) for v in grid.world_to_pixel(star)]
    x, y = (float(v) for v in grid.world_to_pixel(place))
    snr = snr_map(image, tuple(star_px), companions_output["table"].meta["resolution_pixels"])[0]
    near = snr[round(y) - 1 : round(y) + 2, round(x) - 1 : round(x) + 2]
    assert near.min() - 0.5 < row["snr_i2d"] <= near.max() + 1e-9 and row["snr_i2d"] > 5
    assert -1 <= row["corr_separation_pa"] <= 1
    # the residual i2d: the fitted companion subtracted leaves no structure at its place
    residual = next((companions_output["folder"] / "out").glob("*_residual_i2d.fits"))
    with fits.open(residual) as hdul:
        image, grid = hdul["SCI"].data.astype(float), WCS(hdul["SCI"].header, naxis=2)
    snr = snr_map(image, tuple(star_px), companions_output["table"].meta["resolution_pixels"])[0]
    assert abs(snr[round(y), round(x)]) < 3 and abs(row["residual_snr"]) < 3
    assert len(row["transmission"].split(",")) == 2  # one per roll


def test_the_quicklook_is_an_image_of_each_roll_and_the_corner_plot(companions_output):
    (png,) = companions_output["pngs"]
    image = imread(png)
    height, width = image.shape[:2]
    # 2 rolls of 3.0 in and the 3 × 2.1 in corner plot over 9.5 in, at 110 dpi (tight box)
    assert 0.8 * 9.5 * 110 < width < 1.05 * 9.5 * 110
    assert abs(height / width - (2 * 3.0 + 6.5) / 9.5) < 0.15
    assert image[..., :3].std() > 0.05  # drawn, not blank


def test_the_table_records_the_runs_provenance(companions_output):
    meta = companions_output["table"].meta["provenance"]
    with fits.open(companions_output["i2d"]) as hdul:
        run = read_provenance(hdul[0].header)
    assert meta["parameters"]["truncate"] == run["parameters"]["truncate"] == 10
    for name in ("annuli", "iwa", "mode", "bad_bits", "skip", "align_to"):
        given = meta["parameters"][name]
        assert (list(given) if isinstance(given, list) else given) == (
            list(run["parameters"][name])
            if isinstance(run["parameters"][name], tuple)
            else run["parameters"][name]
        )
    assert meta["science"] == run["science"] and meta["psf"] == run["psf"]
    assert meta["version"] == run["version"] and meta["psfmask"] == run["psfmask"]


def _bad(args, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main([*args, "-o", out, "--scheduler", "synchronous"], capsys)
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error" in line]  # the log may precede it
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert not out.exists() or not any(out.iterdir())
    return err


def test_bad_input_is_one_line_exit_2_and_nothing_written(blank, tmp_path, capsys):
    psf = blank.parent / "offaxis_psf.fits"
    err = _bad(["companions", blank, "--offaxis-psf", tmp_path / "no.fits", "--at", "1,30"],
               tmp_path, capsys)  # fmt: skip
    assert "no.fits" in err
    err = _bad(["companions", blank, "--offaxis-psf", psf], tmp_path, capsys)
    assert "--at" in err and "--candidates" in err
    err = _bad(["companions", blank, "--offaxis-psf", psf, "--at", "1,30,4"], tmp_path, capsys)
    assert "--at" in err
    err = _bad(["companions", blank, "--offaxis-psf", psf, "--at", "1,30", "--mode", "ADI",
                "--maxnumbasis", "3", "--truncate", "3"], tmp_path, capsys)  # fmt: skip
    assert "maxnumbasis" in err and "most correlated" in err
    err = _bad(["companions", blank, "--offaxis-psf", psf, "--at", "1,30", "--format", "zarr"],
               tmp_path, capsys)  # fmt: skip
    assert "--format: companions reads its reduction as FITS files" in err
    err = _bad(["companions", blank, "--offaxis-psf", psf, "--at", "30,0"], tmp_path, capsys)
    assert "--at" in err and "falls off exposure 0's frame" in err
    inside = ["--at", "0.1,0", "--iwa", "4"]
    err = _bad(["companions", blank, "--offaxis-psf", psf, *inside], tmp_path, capsys)
    assert "--at" in err and "inside the inner working angle (4 px, --iwa)" in err
    empty = tmp_path / "candidates.ecsv"
    Table({"snr": [3.0, 4.5], "separation_arcsec": [1.0, 0.5], "pa": [10.0, 20.0]}).write(
        empty, format="ascii.ecsv"
    )
    err = _bad(["companions", blank, "--offaxis-psf", psf, "--candidates", empty], tmp_path,
               capsys)  # fmt: skip
    assert "--candidates" in err and "S/N >= 5" in err and str(empty) in err
    err = _bad(["companions", blank, "--offaxis-psf", psf, "--candidates", empty,
                "--min-snr", "0"], tmp_path, capsys)  # fmt: skip
    assert "--min-snr" in err


def test_star_and_plate_scale_errors_widen_as_their_monte_carlo():
    """A companion at ρ = 0.8", θ = 30°, fitted ±4 mas and ±0.3°: with a star-position
    error of 10 mas per axis and a plate scale known to 1 %, the spread of separation,
    PA and the offsets drawn with those errors matches ``widened``'s within 3 %."""
    rng = np.random.default_rng(5)
    n, rho, theta = 400_000, 0.8, np.radians(30.0)
    fit_rho, fit_theta, star, scale = 0.004, np.radians(0.3), 0.010, 0.01
    r = (rho + fit_rho * rng.standard_normal(n)) * (1 + scale * rng.standard_normal(n))
    t = theta + fit_theta * rng.standard_normal(n)
    east = r * np.sin(t) + star * rng.standard_normal(n)
    north = r * np.cos(t) + star * rng.standard_normal(n)
    drawn = {
        "separation": np.hypot(east, north),
        "pa": np.degrees(np.arctan2(east, north)),
        "east": east,
        "north": north,
    }
    fitted = {
        "separation": Estimate(rho, fit_rho, fit_rho),
        "pa": Estimate(30.0, np.degrees(fit_theta), np.degrees(fit_theta)),
        # the fit's offsets' errors, from its ρ and θ errors
        "east": Estimate(
            rho * np.sin(theta),
            *[np.hypot(fit_rho * np.sin(theta), rho * fit_theta * np.cos(theta))] * 2,
        ),
        "north": Estimate(
            rho * np.cos(theta),
            *[np.hypot(fit_rho * np.cos(theta), rho * fit_theta * np.sin(theta))] * 2,
        ),
    }
    for name, estimate in fitted.items():
        if name == "pa":
            wide = widened(estimate, star, scale, angle=rho)
        else:
            wide = widened(estimate, star, scale)
        spread = np.std(drawn[name])
        assert abs(wide.sigma / spread - 1) < 0.03, (name, wide.sigma, spread)
        assert wide.sigma > estimate.sigma * 1.2  # they grow, and by as much as they should


def test_a_sigterm_during_the_fit_leaves_no_companions_product(fitted_cli, tmp_path):
    """SIGTERM once the reduction is placed (``_fmwindows.fits``) and the sampler runs: exit
    143, one line saying what is on disk (the windows; the scratch i2d removed), no ECSV,
    PNG or partial of them."""
    args = list(fitted_cli["args"])
    out = tmp_path / "out"
    args[args.index("-o") + 1] = out
    process = start_cli(*args, "--walkers", 128)  # a fit of seconds more
    deadline = time.monotonic() + 240
    while not list(out.glob("*_fmwindows.fits")) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("coron-dask: error: stopped by SIGTERM")
        and "_fmwindows.fits was written" in last
    )
    assert [p.name.split("_")[-1] for p in out.iterdir()] == ["fmwindows.fits"]
    assert not list(out.glob("*companion*.png")) and not list(out.glob("*.ecsv*"))
    assert not list(out.glob("*partial*"))
