"""``coron-dask run --companions``: the run's candidates fitted on its own cluster once its
products are placed; those products bit-identical to a run without the option
(``benchmarks.hashes``); the residual i2d (every fitted companion subtracted, reduced as the
science) has no significant structure at the simulated companion's place, measured there
by ``photometry.snr_map`` against the run's i2d where it stands out; no candidate above
--min-snr: exit 0, no table; bad options refused in one line before anything runs; SIGTERM
during the residual stage: exit 143, no residual, table or quicklook."""

import json
import logging
import signal
import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from benchmarks.hashes import fingerprints
from coron_dask.science.photometry import snr_map
from coron_dask.science.simulate import simulate, truth_places
from tests.conftest import BLANK, run_main, start_cli

#: the reduction: KLIP in annuli, as the companions command's tests fit it
REDUCTION = ["--truncate", "10", "--annuli", "5", "--iwa", "4"]
#: the fit: the companion only (S/N ~13 in the i2d; a noise peak of ~5.4 is left out), a
#: shorter chain than the default's (the residual is the subject here, not the intervals)
FIT = ["--transmission", "none", "--min-snr", "8", "--max-steps", "1500", "--walkers", "16"]


@pytest.fixture(scope="module")
def fitted_session(tmp_path_factory) -> dict:
    """The simulated companion's observation run plain, and run with --companions."""
    from coron_dask.cli.main import main

    folder = tmp_path_factory.mktemp("companions_session")
    asn = simulate(folder / "sim", **BLANK)
    truth = json.loads((folder / "sim" / "truth.json").read_text())
    common = [*REDUCTION, "--psfmask", folder / "sim" / "psfmask.fits"]
    common += ["--scheduler", "synchronous", "--no-progress"]
    psf = ["--offaxis-psf", folder / "sim" / "offaxis_psf.fits"]
    fitted = ["run", asn, "-o", folder / "fitted", *common, "--companions", *psf, *FIT]
    assert main([str(a) for a in ["run", asn, "-o", folder / "plain", *common]]) == 0
    assert main([str(a) for a in fitted]) == 0
    return dict(folder=folder, asn=asn, truth=truth, common=common, psf=psf, fitted=fitted)


def _snr_at(path, star, place, resolution) -> float:
    """``photometry.snr_map`` of an i2d (its first plane) at the pixel nearest ``place``."""
    with fits.open(path) as hdul:
        image, grid = hdul["SCI"].data.astype(float), WCS(hdul["SCI"].header, naxis=2)
    image = image[0] if image.ndim == 3 else image
    centre = tuple(float(v) for v in grid.world_to_pixel(star))
    x, y = (float(v) for v in grid.world_to_pixel(place))
    return float(snr_map(image, centre, resolution)[0][round(y), round(x)])


def test_the_runs_products_are_those_of_a_run_without_companions(fitted_session):
    plain = fingerprints(fitted_session["folder"] / "plain")
    fitted = fingerprints(fitted_session["folder"] / "fitted")
    assert len(plain) == 15  # 7 crfints, psfstack, 2 psfalign, 2 psfsub, i2d, snr, candidates
    assert {name: fitted[name] for name in plain} == plain
    added = sorted(name.rsplit("_", 1)[-1] for name in set(fitted) - set(plain))
    assert added == ["companions.ecsv", "fmwindows.fits", "i2d.fits"]  # the residual i2d


def test_the_residual_has_no_structure_at_the_fitted_companion(fitted_session):
    """The companion stands at S/N > 10 in the run's i2d; in the residual i2d, at the same
    pixel (the truth's), |S/N| < 3, and the table's residual_snr says so."""
    out = fitted_session["folder"] / "fitted"
    table = Table.read(next(out.glob("*_companions.ecsv")), format="ascii.ecsv")
    assert len(table) == 1 and table.meta["residual_i2d"].endswith("_residual_i2d.fits")
    star, place = truth_places(fitted_session["truth"])
    resolution = table.meta["resolution_pixels"]
    before = _snr_at(next(out.glob("*[0-9]_i2d.fits")), star, place, resolution)
    residual = next(out.glob("*_residual_i2d.fits"))
    after = _snr_at(residual, star, place, resolution)
    assert before > 10, before
    assert abs(after) < 3, after
    assert abs(table["residual_snr"][0]) < 3 and table["snr_i2d"][0] > 10
    with fits.open(residual) as hdul:  # what was subtracted, recorded
        header = hdul[0].header
        assert header["NCOMP"] == 1
        assert np.isclose(header["CON_0"], table["contrast"][0])
        assert np.isclose(header["SEP_0"], table["separation"][0])


def test_no_candidate_above_min_snr_is_a_log_line_and_no_table(fitted_session, tmp_path, capsys):
    args = ["run", fitted_session["asn"], "-o", tmp_path / "out", *fitted_session["common"]]
    code, _, err = run_main(
        [*args, "--companions", *fitted_session["psf"], "--min-snr", "1000"], capsys
    )
    assert code == 0, err
    assert "0 of 2 candidates" in err and "no candidate to fit" in err
    assert not list((tmp_path / "out").glob("*companion*")) and list(
        (tmp_path / "out").glob("*_candidates.ecsv")
    )


def test_bad_companion_options_are_one_line_before_anything_runs(blank, tmp_path, capsys):
    psf = ["--offaxis-psf", blank.parent / "offaxis_psf.fits"]
    out = tmp_path / "out"
    for extra, said in (
        (["--companions"], "--companions: needs the star's off-axis PSF"),
        (psf, "--offaxis-psf: fits companions: it goes with --companions"),
        (["--companions", *psf, "--no-psfalign"], "--no-psfalign"),
        (["--companions", *psf, "--format", "zarr"], "--format: --companions reads"),
        (["--companions", *psf, "--truncate", "5", "--kl", "7"], "--kl: 7 is not one of"),
    ):
        code, _, err = run_main(["run", blank, "-o", out, *extra, "--scheduler", "synchronous"],
                                capsys)  # fmt: skip
        assert code == 2, err
        errors = [line for line in err.splitlines() if "error" in line]
        assert len(errors) == 1 and said in errors[0], err
        assert not out.exists() or not any(out.iterdir())


def test_a_sigterm_during_the_residual_leaves_no_residual_table_or_quicklook(
    fitted_session, tmp_path
):
    """SIGTERM while the residual i2d is being written (its partial file there): exit 143,
    the run's products and the windows on disk, said in one line; no residual, ECSV, PNG
    or partial file."""
    args = list(fitted_session["fitted"])
    out = tmp_path / "out"
    args[args.index("-o") + 1] = out
    args[args.index("--max-steps") + 1] = 300  # a shorter fit: the residual is the subject
    process = start_cli(*args)
    deadline = time.monotonic() + 240
    partial = out / (
        "." + next(fitted_session["folder"].joinpath("fitted").glob("*_residual_i2d.fits")).name
    )
    partial = partial.with_name(partial.name + ".partial")
    while not partial.exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("coron-dask: error: stopped by SIGTERM") and "16 products" in last
    assert not list(out.glob("*residual*")) and not list(out.glob("*.ecsv.*"))
    assert not list(out.glob("*companion*")) and not list(out.glob(".*"))


class _Kept(logging.Handler):
    """The records a logger hands on (distributed's do not propagate to pytest's)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_windows_and_the_residual_are_computed_on_the_runs_own_cluster(
    fitted_session, tmp_path
):
    """run_coron3(client=..., companions=...): the windows (``companion-windows`` tasks)
    and the residual (``inject-sci`` tasks) run on the client's cluster, after the run,
    with no key submitted twice with two graphs (distributed's warning); the residual
    leaves |S/N| < 3 at the companion, as on dask's synchronous scheduler."""
    from distributed import Client, LocalCluster, get_task_stream

    from coron_dask import run_coron3
    from coron_dask.pipeline.companion_session import SessionCompanions
    from coron_dask.science.companion_fit import FitSettings

    sim = fitted_session["folder"] / "sim"
    companions = SessionCompanions(
        sim / "offaxis_psf.fits",
        transmission="none",
        min_snr=8,
        settings=FitSettings.configured(max_steps=500, walkers=16),  # the flow, not the intervals
    )
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
        get_task_stream(client=client) as stream,
    ):
        kept = _Kept()
        logging.getLogger("distributed.scheduler").addHandler(kept)
        paths = run_coron3(
            fitted_session["asn"],
            tmp_path,
            psfmask=sim / "psfmask.fits",
            client=client,
            progress=False,
            companions=companions,
            truncate=10,
            annuli=5,
            iwa=4.0,
        )
        logging.getLogger("distributed.scheduler").removeHandler(kept)
    names = {str(task["key"]) for task in stream.data}
    assert any("companion-windows" in name for name in names)
    assert any("inject-sci" in name for name in names)
    assert not [r for r in kept.records if "run_spec" in r.getMessage()]
    table = Table.read(next(p for p in paths if p.name.endswith("_companions.ecsv")))
    assert len(table) == 1 and abs(table["residual_snr"][0]) < 3
    assert [p.name.rsplit("_", 1)[-1] for p in paths[-4:]] == [
        "fmwindows.fits",
        "i2d.fits",
        "companions.ecsv",
        "companion1.png",
    ]


def test_a_kl_mode_cubes_candidates_are_those_of_the_plane_fitted(blank, tmp_path):
    """The detection of a KL-mode cube finds a companion on each plane (a row per plane,
    ``kl``): only the fitted plane's rows are fitted (the largest, or --kl), not the same
    companion once per plane."""
    from coron_dask.pipeline.companion_session import _candidates
    from coron_dask.pipeline.observation import open_association

    ecsv = tmp_path / "x_candidates.ecsv"
    Table(
        {
            "snr": [12.8, 5.4, 13.3, 5.4],
            "separation_arcsec": [1.047, 2.900, 1.046, 2.901],
            "pa": [53.26, 121.14, 53.27, 121.13],
            "kl": [5, 5, 10, 10],
        }
    ).write(ecsv, format="ascii.ecsv")
    observation = open_association(blank)
    (largest,) = _candidates([ecsv], 8.0, None, observation, 4.0)
    assert (largest.separation, largest.position_angle) == (1.046, 53.27)
    (five,) = _candidates([ecsv], 8.0, 5, observation, 4.0)
    assert (five.separation, five.position_angle) == (1.047, 53.26)
    assert len(_candidates([ecsv], 5.0, 10, observation, 4.0)) == 2
