"""Every product records how it was made: coron-dask's version, the date, the step
parameters and block plan used, and the member exposures that went into it; in FITS
headers and in Zarr attributes alike."""

import json
import re
import time
import tomllib
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import dask
import pytest
from astropy.io import fits

import coron_dask
from coron_dask import run_coron3
from coron_dask.pipeline.provenance import read_provenance

#: KLIP tiles of 5 rows of the 64-row frames with all 9 references (ADI+RDI: the 6 of the
#: reference star and the other roll's 3 integrations; not the default: 64).
KLIP_TILE = 9 * 64 * 4 * 5
#: Non-default values for every recorded parameter, different in the two runs, and blocks
#: given explicitly.
FITS_RUN = {
    "skip": (),
    "snr": 4.5,
    "maskpt": 0.6,
    "good_bits": "~DO_NOT_USE,SATURATED",
    "align_to": "first",
    "median_box_length": 5,
    "bad_bits": "DO_NOT_USE, SATURATED",
    "truncate": 5,  # fewer than the 6 references: recorded as given
    "annuli": 2,
    "subsections": 3,
    "annuli_spacing": "log",
    "iwa": 3.0,
    "owa": 28.5,
    "mode": "ADI+RDI",
    "movement": 2.5,
    "maxnumbasis": 6,  # 6 of the 9 references (ADI+RDI) per integration and zone
    "orientation": "north",
    "save_psfalign": True,
}
FITS_PLAN = {"integrations": 1, "psfs": 4, "outlier_rows": 7, "klip_rows": 5}
ZARR_RUN = {
    "skip": ("outlier_detection",),
    "snr": 6.0,
    "maskpt": 0.8,
    "good_bits": "~DO_NOT_USE+SATURATED",
    "align_to": "each",
    "median_box_length": 7,
    "bad_bits": 3,
    "truncate": (2, 3),  # a KL-mode cube (ADI: of the other roll's 3 integrations)
    "annuli": 3,
    "subsections": 2,
    "annuli_spacing": "linear",
    "iwa": 2.0,
    "owa": None,  # the default, recorded as "none"
    "mode": "ADI",
    "movement": 0.5,
    "maxnumbasis": None,  # the default: every reference, recorded as "none"
    "orientation": "detector",
    "save_psfalign": False,
}
ZARR_PLAN = {"integrations": 2, "psfs": 3, "outlier_rows": 9, "klip_rows": 64}


def _run(asn, folder, parameters, plan, **options):
    """Run synchronously; give the products and the UTC times before and after."""
    blocks = {name: plan[name] for name in ("integrations", "psfs", "outlier_rows")}
    start = datetime.now(UTC)
    paths = run_coron3(
        asn, folder, scheduler="synchronous", progress=False, **parameters, **blocks, **options
    )
    return paths, start, datetime.now(UTC)


@pytest.fixture(scope="module")
def fits_run(asn, observation_dir, tmp_path_factory):
    """Run in a time zone 12 hours from UTC: DATE must be UTC all the same."""
    with (
        pytest.MonkeyPatch.context() as patch,
        dask.config.set({"coron_dask.chunks.klip-tile": KLIP_TILE}),
    ):
        patch.setenv("TZ", "NZST-12")
        time.tzset()
        try:
            return _run(
                asn,
                tmp_path_factory.mktemp("provenance_fits"),
                FITS_RUN,
                FITS_PLAN,
                psfmask=observation_dir / "psfmask.fits",
            )
        finally:
            patch.undo()
            time.tzset()


@pytest.fixture(scope="module")
def zarr_run(asn, tmp_path_factory):
    return _run(asn, tmp_path_factory.mktemp("provenance_zarr"), ZARR_RUN, ZARR_PLAN, format="zarr")


def members(asn: Path) -> dict[str, list[str]]:
    """The ASN's member file names by exposure type, read straight from its JSON."""
    table = json.loads(asn.read_text())["products"][0]["members"]
    return {
        kind: [Path(m["expname"]).name for m in table if m["exptype"] == kind]
        for kind in ("science", "psf")
    }


def expected_inputs(name: str, asn: Path) -> dict[str, list[str]]:
    """The members that go into the product ``name``: a crfints its own exposure; psfstack
    the references; psfalign and psfsub their science exposure and the references; the i2d
    every science exposure (and the references subtracted from them)."""
    exposures = members(asn)
    stem = name.rsplit(".", 1)[0]
    if stem.endswith("_psfstack"):
        return {"science": [], "psf": exposures["psf"]}
    if stem.endswith(("_i2d", "_snr")):  # the detection map: the i2d's record
        return exposures
    root, _, suffix = stem.rpartition("_c1000_")
    own = f"{root}_calints.fits"
    if suffix == "crfints":
        return {kind: [own] if own in found else [] for kind, found in exposures.items()}
    assert suffix in ("psfalign", "psfsub"), name
    return {"science": [own], "psf": exposures["psf"]}


def expected_steps(name: str, skip: tuple[str, ...]) -> dict[str, str]:
    """The S_* status of the steps that made the product ``name`` (as jwst's products)."""
    kind = name.rsplit(".", 1)[0].rsplit("_", 1)[1]
    steps = {
        "crfints": ["outlier_detection"],
        "psfstack": ["outlier_detection", "stack_refs"],
        "psfalign": ["outlier_detection", "stack_refs", "align_refs"],
        "psfsub": ["outlier_detection", "align_refs", "klip"],
        "i2d": ["outlier_detection", "align_refs", "klip", "resample"],
    }[kind.replace("snr", "i2d")]
    return {step: "SKIPPED" if step in skip else "COMPLETE" for step in steps}


def history(entries) -> str:
    """HISTORY entries as one text (FITS wraps long ones onto indented cards)."""
    return " ".join(str(entry).strip() for entry in entries)


def check_record(keywords, name, asn, parameters, plan, psfmask, start, end) -> None:
    """The provenance keywords of the product ``name`` against what its run was given."""
    record = read_provenance(keywords)
    assert keywords["CAL_VER"] == coron_dask.__version__, name
    assert record["software"] == "coron-dask"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", keywords["DATE"]), name
    # DATE is UTC, made during the run (to the millisecond it keeps)
    assert start - timedelta(seconds=1) <= record["date"] <= end, (name, record["date"])
    assert record["asn"] == asn.name
    assert record["psfmask"] == psfmask
    assert record["parameters"] == parameters, name
    assert record["plan"] == plan, name
    inputs = expected_inputs(name, asn)
    assert {"science": record["science"], "psf": record["psf"]} == inputs, name
    assert record["steps"] == expected_steps(name, parameters["skip"]), name
    text = history(keywords["HISTORY"])
    assert f"coron-dask {coron_dask.__version__} calwebb_coron3" in text
    truncate = parameters["truncate"]  # a KL-mode cube's cutoffs as 2,4
    truncate = truncate if isinstance(truncate, int) else ",".join(map(str, truncate))
    assert f"truncate={truncate} " in text
    blocks = (
        f"block plan: {plan['integrations']} integration(s) x {plan['psfs']} reference(s) per "
        f"alignment block, {plan['outlier_rows']} row(s) per outlier median slab, "
        f"{plan['klip_rows']} row(s) per KLIP tile"
    )
    assert blocks in text, text


def test_fits_products_record_how_they_were_made(fits_run, asn):
    paths, start, end = fits_run
    # 5 crfints, psfstack, 2 psfalign, 2 psfsub, i2d, and the detection map and candidates
    assert len(paths) == 13
    dates = set()
    for path in (p for p in paths if p.suffix == ".fits"):
        with fits.open(path) as hdul:
            hdul.verify("exception")  # standard cards only: no HIERARCH, no long lines
            header = hdul[0].header
            check_record(header, path.name, asn, FITS_RUN, FITS_PLAN, "psfmask.fits", start, end)
            dates.add(header["DATE"])
    assert len(dates) == 1  # one DATE for every product of a run


def test_zarr_products_record_how_they_were_made(zarr_run, asn):
    """No crfints (outlier_detection skipped: SKIPPED in every product), no psfalign, no
    PSFMASK (N/A); the same keywords as attributes."""
    import xarray as xr

    paths, start, end = zarr_run
    paths = [p for p in paths if p.suffix == ".zarr"]  # not the candidates' table
    names = sorted(p.name.rsplit("_", 1)[1] for p in paths)
    assert names == ["i2d.zarr", "psfstack.zarr", "psfsub.zarr", "psfsub.zarr", "snr.zarr"]
    for path in paths:
        attrs = xr.open_zarr(path).attrs
        assert isinstance(attrs["HISTORY"], list)
        check_record(attrs, path.name, asn, ZARR_RUN, ZARR_PLAN, None, start, end)
        assert attrs["S_OUTLIR"] == "SKIPPED"


def test_version_is_the_installed_package_metadata():
    assert coron_dask.__version__ == metadata.version("coron-dask")


def test_version_falls_back_to_pyproject_in_a_source_tree(monkeypatch):
    """Not installed: the version pyproject.toml declares (then "0+unknown", not a guess)."""

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    pyproject = Path(coron_dask.__file__).parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert coron_dask._version() == declared
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: "")
    assert coron_dask._version() == "0+unknown"
