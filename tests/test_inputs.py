"""Bad input is refused or flagged, never passed through: a KL cutoff of 0, more cutoffs than
references, reference frames the alignment cannot fit, input files that cannot be read."""

import json
import logging

import numpy as np
import pytest
from astropy.io import fits

from coron_dask import run_coron3
from coron_dask.core.errors import CoronInputError
from coron_dask.pipeline.build import build_products
from tests import jwst_reference
from tests.conftest import SMALL, run_main

NPSF = SMALL["psf_exps"] * SMALL["psf_ints"]  # references in the stack
#: outlier_detection and resample play no part here: skipped, the runs take a second
QUICK = {"skip": ("outlier_detection", "resample"), "scheduler": "synchronous", "progress": False}
#: the relative L2 of our psfsub to jwst's functions (tests/test_pipeline.py's)
PSFSUB_L2 = 1e-5


def images(folder) -> dict:
    """Every image extension of every FITS product in ``folder``: {(file, EXTNAME): data}."""
    found = {}
    for path in sorted(folder.glob("*.fits")):
        with fits.open(path) as hdul:
            for hdu in hdul[1:]:
                if hdu.is_image:
                    found[path.name, hdu.name] = hdu.data.copy()
    return found


def member(asn, kind: str, index: int = 0):
    """The path of the ``index``-th member of ``kind`` (science, psf) of ``asn``."""
    members = json.loads(asn.read_text())["products"][0]["members"]
    return asn.parent / [m["expname"] for m in members if m["exptype"] == kind][index]


def without(asn, left_out) -> object:
    """A copy of association ``asn`` (beside it) without member ``left_out``."""
    table = json.loads(asn.read_text())
    members = table["products"][0]["members"]
    table["products"][0]["members"] = [m for m in members if m["expname"] != left_out.name]
    path = asn.with_name("without_asn.json")
    path.write_text(json.dumps(table))
    return path


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coron-dask: error: "), err
    return lines[0]


# --truncate


@pytest.mark.parametrize("truncate", [0, (5, 0), -1])
def test_build_products_refuses_a_cutoff_below_one(asn, tmp_path, truncate):
    """jwst's klip takes 0 (no KL mode: the psfsub is the science frame itself); the API
    refuses it where the parameters are read, as the command line does (test_parameters)."""
    with pytest.raises(CoronInputError) as error:
        build_products(asn, tmp_path / "out", psfmask="none", truncate=truncate)
    assert error.value.source == "truncate" and ">= 1" in error.value.problem
    assert list(tmp_path.iterdir()) == []


def test_cutoffs_above_the_references_are_their_number(asn, tmp_path, caplog):
    """truncate 1000 with 6 references is truncate 6 (jwst slices its KL vectors: the same
    modes), logged; the products are those of truncate 6, and say 6. In a KL-mode cube,
    cutoffs that become one are kept once."""
    runs = {
        "1000": 1000,
        "6": NPSF,
        "2,50,1000": (2, 50, 1000),
        "2,6": (2, NPSF),
        "50": 50,  # the default (jwst's): told, not warned
    }
    with caplog.at_level(logging.INFO, logger="coron_dask"):
        for name, truncate in runs.items():
            run_coron3(asn, tmp_path / name, psfmask="none", truncate=truncate, **QUICK)
    said = [r for r in caplog.records if "KL modes kept" in r.getMessage()]
    warned = [r.getMessage() for r in said if r.levelno == logging.WARNING]
    told = [r.getMessage() for r in said if r.levelno == logging.INFO]
    assert told == [f"klip: truncate 50 is more than the {NPSF} references: {NPSF} KL modes kept"]
    assert warned == [
        f"klip: truncate 1000 is more than the {NPSF} references: {NPSF} KL modes kept",
        f"klip: truncate 2,50,1000 is more than the {NPSF} references: 2,{NPSF} KL modes "
        "kept (1 cutoff(s) the same as another, dropped)",
    ]
    for asked, used in (("1000", "6"), ("50", "6"), ("2,50,1000", "2,6")):
        ours, theirs = images(tmp_path / asked), images(tmp_path / used)
        assert ours.keys() == theirs.keys() and len(ours) > 0
        for key, data in ours.items():
            np.testing.assert_array_equal(data, theirs[key], err_msg=str(key))
    for path in (tmp_path / "1000").glob("*_psfsub.fits"):
        assert fits.getheader(path)["TRUNCATE"] == NPSF
        assert fits.getdata(path, "SCI").ndim == 3  # jwst's layout: one cutoff, no kl axis
    for path in (tmp_path / "2,50,1000").glob("*_psfsub.fits"):
        assert fits.getheader(path)["TRUNCATE"] == f"2,{NPSF}"
        header = fits.getheader(path, "SCI")
        assert (header["KLMODE0"], header["KLMODE1"], "KLMODE2" in header) == (2, NPSF, False)
        assert fits.getdata(path, "SCI").shape[0] == 2


# references the alignment cannot fit


@pytest.mark.parametrize("damage", ["nan", "zero"])
def test_a_reference_that_cannot_be_fitted_is_flagged_and_left_out(
    damage, observation_copy, tmp_path, caplog
):
    """A reference exposure of NaN (the fill leaves an all-zero frame) or of zeros has no
    signal to fit: its pairs are CONVERGED 0 in ALIGN (not (0, 0, 1) as a perfect fit),
    counted in the log, NaN in psfalign, and left out by klip: the psfsub is finite and the
    one jwst's functions give without that reference, as is our run without it."""
    asn = next(observation_copy.glob("*_asn.json"))
    bad = member(asn, "psf", 1)
    with fits.open(bad, mode="update") as hdul:
        hdul["SCI"].data[:] = np.nan if damage == "nan" else 0.0
    mask = observation_copy / "psfmask.fits"
    with caplog.at_level(logging.WARNING, logger="coron_dask"):
        paths = run_coron3(asn, tmp_path / "out", psfmask=mask, truncate=3, **QUICK)
    lost = SMALL["psf_ints"]  # the bad exposure's integrations
    pairs = SMALL["sci_ints"] * NPSF
    for root in [p.name.removesuffix("_psfsub.fits") for p in paths if "_psfsub" in p.name]:
        assert (
            f"align_refs: {SMALL['sci_ints'] * lost} of {pairs} reference fits to "
            f"{root}_psfsub.fits did not converge: flagged"
        ) in caplog.text
    kept = without(asn, bad)
    expected = jwst_reference.coron3(kept, mask, "each", truncate=3, outliers=False)
    run_coron3(kept, tmp_path / "without", psfmask=mask, truncate=3, **QUICK)
    for path in (p for p in paths if p.name.endswith("_psfsub.fits")):
        with fits.open(path) as hdul:
            align = hdul["ALIGN"].data
            flagged = np.asarray(align["PSF_FILE"], dtype=str) == bad.name
            assert flagged.sum() == SMALL["sci_ints"] * lost
            np.testing.assert_array_equal(align["CONVERGED"], np.where(flagged, 0, 1))
            assert np.isnan(align["DX"][flagged]).all() and np.isfinite(align["DX"][~flagged]).all()
            sci, err = (hdul[name].data.astype(np.float64) for name in ("SCI", "ERR"))
        aligned = fits.getdata(path.with_name(path.name.replace("psfsub", "psfalign")), "SCI")
        used = np.asarray(align["PSF_FILE"][:NPSF], dtype=str) != bad.name
        assert np.isnan(aligned[:, ~used]).all() and np.isfinite(aligned[:, used]).all()
        assert np.isfinite(sci).all() and np.isfinite(err).all()
        reference = expected[path.name.removesuffix("_c1000_psfsub.fits")]
        for ours, theirs in ((sci, reference["psfsub_sci"]), (err, reference["psfsub_err"])):
            assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < PSFSUB_L2
        for name, ours in (("SCI", sci), ("ERR", err)):  # and our run without it
            theirs = fits.getdata(tmp_path / "without" / path.name, name)
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())


# input files that cannot be read


def _cut_inside_dq(path):
    with fits.open(path) as hdul:
        start = hdul["DQ"].fileinfo()["datLoc"]
    with open(path, "r+b") as handle:
        handle.truncate(start + 100)


def _cut_inside_the_last_extension(path):
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 3000)


def _folder(path):
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_cut_inside_dq, "truncated FITS file"),
        (_cut_inside_the_last_extension, "truncated FITS file"),
        (_folder, "is a folder, not a FITS file"),
        (lambda path: path.unlink(), "file not found"),
    ],
)
@pytest.mark.parametrize("kind", ["science", "psf"])
def test_an_input_that_cannot_be_read_is_bad_input(
    kind, damage, problem, observation_copy, tmp_path, capsys
):
    """A member cut short, a folder in its place, a member missing: exit 2 (not 4, "products
    could not be written"), one line naming the file, nothing written."""
    asn = next(observation_copy.glob("*_asn.json"))
    broken = member(asn, kind, 1)
    damage(broken)
    out = tmp_path / "out"
    code, _, err = run_main(["run", asn, "-o", out, "--psfmask", "none"], capsys)
    assert code == 2, err
    assert one_line(err) == f"coron-dask: error: {broken}: {problem}" or (
        one_line(err).startswith(f"coron-dask: error: {broken}: {problem} (")
    )
    assert not out.exists()
