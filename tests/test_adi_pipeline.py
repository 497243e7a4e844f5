"""ADI+RDI through the whole pipeline, from the command line: psfalign holds the other
roll's integrations after the reference star's frames, aligned to each science integration
(their fitted offsets are the simulated pointings'), its ALIGN table says which is which;
products bit for bit the same whatever the blocks of integrations and references; the
ADI references kept per zone logged; bad modes refused in one line."""

import json

import dask
import numpy as np
import pytest
from astropy.io import fits

from coron_dask.cli.main import main
from tests.conftest import assert_same_products, run_main

ADI = ["--mode", "ADI+RDI", "--movement", "2", "--annuli", "3", "--subsections", "2"]
ADI += ["--truncate", "2,4"]
#: (align_to, integrations per block, references per alignment block)
BLOCKS = [("each", 1, 1), ("each", 2, 5), ("each", 3, 4), ("first", 1, 1), ("first", 3, 4)]
KLIP_TILE = 9 * 64 * 4 * 5  # tiles of 5 rows (9 references: 6 RDI, 3 ADI)


@pytest.fixture(scope="module")
def reduced(asn, observation_dir, tmp_path_factory) -> dict:
    """The ADI+RDI products of each block shape of BLOCKS, synchronously."""
    out = {}
    mask = observation_dir / "psfmask.fits"
    with dask.config.set({"coron_dask.chunks.klip-tile": KLIP_TILE}):
        for align_to, integrations, psfs in BLOCKS:
            folder = tmp_path_factory.mktemp(f"adi_{align_to}")
            blocks = ["--integrations-per-chunk", integrations, "--psfs-per-chunk", psfs]
            args = ["run", asn, "-o", folder, "--psfmask", mask, "--align-to", align_to, *blocks]
            assert main([str(a) for a in [*args, *ADI, "--scheduler", "synchronous"]]) == 0
            out[align_to, integrations, psfs] = folder
    return out


@pytest.mark.parametrize("blocks", [b for b in BLOCKS if b[1:] != (1, 1)], ids=str)
def test_adi_products_do_not_depend_on_the_blocks(blocks, reduced):
    assert_same_products(reduced[blocks], reduced[blocks[0], 1, 1])


def test_psfalign_holds_the_other_rolls_integrations_aligned(reduced, observation_dir):
    """Each science exposure's psfalign: the reference star's 6 frames, then the other
    roll's 3 integrations (KIND, ROLL, PSF_FILE, PSF_INT), each aligned to every science
    integration with offsets (DX, DY) the simulated pointings' differences."""
    truth = json.loads((observation_dir / "truth.json").read_text())["frames"]
    psfaligns = sorted(reduced["each", 1, 1].glob("*_psfalign.fits"))
    assert len(psfaligns) == 2
    names = sorted(name for name in truth if name.startswith("jw01386001"))
    for path, own, other in zip(psfaligns, names, names[::-1], strict=True):
        with fits.open(path) as hdul:
            assert hdul["SCI"].data.shape == (3, 9, 64, 64)
            table = hdul["ALIGN"].data
            assert hdul[0].header["KLIPMODE"] == "ADI+RDI" and hdul[0].header["MOVEMENT"] == 2
        rows = table[table["INTEGRATION"] == 1]
        assert list(rows["PSF"]) == list(range(9))
        assert list(rows["KIND"]) == ["RDI"] * 6 + ["ADI"] * 3
        assert set(rows["PSF_FILE"][6:]) == {other} and list(rows["PSF_INT"][6:]) == [1, 2, 3]
        assert set(np.round(rows["ROLL"][6:], 6)) == (
            {120.0} if own.endswith("1_nrcalong_calints.fits") else {110.0}
        )
        adi = table[table["KIND"] == "ADI"]
        theirs = np.array(truth[other]["star_offset"])[adi["PSF_INT"] - 1]
        ours = np.array(truth[own]["star_offset"])[adi["INTEGRATION"] - 1]
        np.testing.assert_allclose(adi["DX"], theirs[:, 0] - ours[:, 0], atol=0.03)
        np.testing.assert_allclose(adi["DY"], theirs[:, 1] - ours[:, 1], atol=0.03)
        assert (adi["CONVERGED"] == 1).all()


def test_adi_references_per_zone_are_logged(asn, observation_dir, tmp_path, capsys):
    args = ["run", asn, "-o", tmp_path / "out", "--psfmask", observation_dir / "psfmask.fits"]
    args += [*ADI, "--scheduler", "synchronous", "--skip", "resample"]
    code, _, err = run_main(args, capsys)
    assert code == 0
    assert "ADI references kept per zone (of 3; movement 2 px at radii" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "SDI"], "argument --mode: invalid choice"),
        (["--movement", "-1"], "--movement"),
    ],
)
def test_bad_modes_are_refused_in_one_line(asn, tmp_path, capsys, args, message):
    code, _, err = run_main(["run", asn, "-o", tmp_path / "out", *args], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("command", ["run", "demo", "contrast"])
def test_every_run_command_takes_the_mode(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    assert "--mode {RDI,ADI,ADI+RDI}" in out and "--movement" in out


def test_adi_of_one_roll_is_refused_in_one_line(tmp_path, capsys):
    """Science at one roll has no ADI reference: exit 2, one line naming --mode, nothing
    written."""
    from coron_dask.science.simulate import simulate

    asn = simulate(tmp_path / "sim", size=64, sci_exps=1, sci_ints=2, psf_exps=2, psf_ints=2)
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--mode", "ADI", "--psfmask", "none"]
    code, _, err = run_main([*args, "--scheduler", "synchronous"], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [
        "coron-dask: error: --mode: ADI: the science exposures are all at one roll (110 deg)"
    ]
    assert not out.exists()
