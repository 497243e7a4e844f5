"""KLIP in zones through the whole pipeline, from the command line: products bit for bit
the same whatever the blocks of integrations and references (and KLIP tiles that cut the
zones), NaN exactly where no zone is, the zones recorded in the headers and logged; one
zone over every pixel is the whole frame's KLIP (jwst's)."""

from pathlib import Path

import dask
import numpy as np
import pytest
from astropy.io import fits

from coron_dask.cli.main import main
from coron_dask.pipeline.build import exposure_zones
from coron_dask.pipeline.observation import open_association
from tests.conftest import assert_same_products, run_main

ZONES = ["--annuli", "3", "--subsections", "4", "--annuli-spacing", "log", "--iwa", "3"]
ZONES += ["--owa", "30", "--truncate", "2,4,6"]
#: (align_to, integrations per block, references per alignment block)
BLOCKS = [("each", 1, 1), ("each", 2, 5), ("each", 3, 6), ("first", 1, 1), ("first", 3, 4)]
KLIP_TILE = 6 * 64 * 4 * 5  # tiles of 5 rows: every zone cut across several


@pytest.fixture(scope="module")
def zoned(asn, observation_dir, tmp_path_factory) -> dict:
    """The products of each block shape of BLOCKS, in zones, synchronously."""
    out = {}
    mask = observation_dir / "psfmask.fits"
    with dask.config.set({"coron_dask.chunks.klip-tile": KLIP_TILE}):
        for mode, integrations, psfs in BLOCKS:
            folder = tmp_path_factory.mktemp(f"zoned_{mode}")
            blocks = ["--integrations-per-chunk", integrations, "--psfs-per-chunk", psfs]
            args = ["run", asn, "-o", folder, "--psfmask", mask, "--align-to", mode, *blocks]
            code = main([str(a) for a in [*args, *ZONES, "--scheduler", "synchronous"]])
            assert code == 0
            out[mode, integrations, psfs] = folder
    return out


@pytest.mark.parametrize("blocks", [b for b in BLOCKS if b[1:] != (1, 1)], ids=str)
def test_zoned_products_do_not_depend_on_the_blocks(blocks, zoned):
    assert_same_products(zoned[blocks], zoned[blocks[0], 1, 1])


@pytest.mark.parametrize("mode", ["each", "first"])
def test_psfsub_is_nan_where_no_zone_is_and_records_the_zones(mode, zoned, asn):
    for exposure in open_association(asn).science:
        source = Path(exposure.encoding["source"])
        zones = exposure_zones(
            exposure,
            dict(annuli=3, subsections=4, annuli_spacing="log", iwa=3.0, owa=30.0),
            logged=False,
        )
        root = source.name.removesuffix("_calints.fits")
        with fits.open(zoned[mode, 1, 1] / f"{root}_c1000_psfsub.fits") as hdul:
            header = hdul[0].header
            assert (header["ANNULI"], header["SUBSECTS"], header["ANNSPACE"]) == (3, 4, "log")
            assert (header["IWA"], header["OWA"]) == (3.0, 30.0)
            for name in ("SCI", "ERR"):
                data = hdul[name].data  # (kl, integration, y, x)
                outside = zones.labels < 0
                assert np.isnan(data[..., outside]).all()
                assert np.isfinite(data[..., ~outside]).all()


def test_zones_are_logged(asn, observation_dir, tmp_path, capsys):
    args = ["run", asn, "-o", tmp_path / "out", "--psfmask", observation_dir / "psfmask.fits"]
    args += [*ZONES, "--scheduler", "synchronous", "--skip", "resample"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert "klip: the star of jw01386001001_03106_00001_nrcalong_calints.fits at (x, y) = (" in err
    assert "12 zone(s): 3 annuli × 4 subsection(s) about the star" in err
    assert "annuli edges 3.0, " in err and ", 30.0 px" in err and "(log spacing)" in err


def test_one_zone_over_every_pixel_is_the_whole_frame_klip(asn, observation_dir, tmp_path):
    """One zone reaching past the farthest pixel makes the zone machinery do the whole
    frame's KLIP: the default's products (jwst's arithmetic, no zone map) to rounding."""
    mask = observation_dir / "psfmask.fits"
    folders = {}
    for name, zone in [("default", []), ("one", ["--owa", "100"])]:
        folders[name] = tmp_path / name
        args = ["run", asn, "-o", folders[name], "--psfmask", mask, "--truncate", "2,4", *zone]
        assert main([str(a) for a in [*args, "--scheduler", "synchronous"]]) == 0
    for path in folders["default"].glob("*_psfsub.fits"):
        with fits.open(path) as whole, fits.open(folders["one"] / path.name) as zoned:
            assert "OWA" in zoned[0].header and zoned[0].header["OWA"] == 100.0
            for name in ("SCI", "ERR"):
                ours, theirs = zoned[name].data, whole[name].data
                assert np.isfinite(ours).all()
                scale = np.linalg.norm(theirs)
                assert np.linalg.norm(ours.astype(np.float64) - theirs) < 1e-6 * scale


@pytest.mark.parametrize("command", ["run", "demo", "contrast"])
def test_every_run_command_takes_the_zones(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    for option in ("--annuli", "--subsections", "--annuli-spacing", "--iwa", "--owa"):
        assert option in out
