"""The PSFMASK from CRDS, as jwst finds it: offline, from a CRDS cache the test builds (a
context whose rules give the simulator's mask for its NIRCam header), and one line when
CRDS has none or cannot be reached."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from astropy.io import fits

from coron_dask.io.reference_files import crds_parameters
from tests.conftest import ROOT, assert_same_products, run_cli

REFERENCE = "jwst_nircam_psfmask_0001.fits"
PMAP = """header = {{
    'derived_from' : 'coron-dask tests',
    'mapping' : 'PIPELINE',
    'name' : 'jwst_0001.pmap',
    'observatory' : 'JWST',
    'parkey' : ('META.INSTRUMENT.NAME',),
    'sha1sum' : '0',
}}

selector = {{
    'NIRCAM' : 'jwst_nircam_0001.imap',
}}
"""
IMAP = """header = {{
    'derived_from' : 'coron-dask tests',
    'instrument' : 'NIRCAM',
    'mapping' : 'INSTRUMENT',
    'name' : 'jwst_nircam_0001.imap',
    'observatory' : 'JWST',
    'parkey' : ('REFTYPE',),
    'sha1sum' : '0',
}}

selector = {{
    'psfmask' : 'jwst_nircam_psfmask_0001.rmap',
}}
"""
# jwst's NIRCam PSFMASK rules select by detector, filter, pupil, coronagraph and subarray,
# then by date: the simulator's header matches the first rule only
RMAP = """header = {{
    'classes' : ('Match', 'UseAfter'),
    'derived_from' : 'coron-dask tests',
    'filekind' : 'PSFMASK',
    'instrument' : 'NIRCAM',
    'mapping' : 'REFERENCE',
    'name' : 'jwst_nircam_psfmask_0001.rmap',
    'observatory' : 'JWST',
    'parkey' : (('META.INSTRUMENT.DETECTOR', 'META.INSTRUMENT.FILTER', \
'META.INSTRUMENT.PUPIL', 'META.INSTRUMENT.CORONAGRAPH', 'META.SUBARRAY.NAME'), \
('META.OBSERVATION.DATE', 'META.OBSERVATION.TIME')),
    'sha1sum' : '0',
}}

selector = Match({{
    ('NRCALONG', 'F410M', 'MASKRND', 'MASKA335R', 'GENERIC') : UseAfter({{
        '2022-01-01 00:00:00' : '{reference}',
    }}),
    ('NRCALONG', 'F444W', 'MASKRND', 'MASKA335R', 'GENERIC') : UseAfter({{
        '2022-01-01 00:00:00' : 'jwst_nircam_psfmask_0002.fits',
    }}),
}})
"""
SERVER_CONFIG = {
    "observatory": "jwst",
    "operational_context": "jwst_0001.pmap",
    "edit_context": "jwst_0001.pmap",
    "bad_files": "",
    "bad_files_list": [],
    "force_remote_mode": False,
    "last_synced": "2026-12-01 00:00:00",
}


def crds_cache(folder: Path, psfmask: Path) -> Path:
    """A CRDS cache as ``crds sync`` leaves one (mappings with their checksums, the
    reference file, the server's configuration), whose context gives ``psfmask``."""
    from crds.refactoring.checksum import update_checksum

    mappings = folder / "mappings" / "jwst"
    mappings.mkdir(parents=True)
    for name, text in (
        ("jwst_0001.pmap", PMAP),
        ("jwst_nircam_0001.imap", IMAP),
        ("jwst_nircam_psfmask_0001.rmap", RMAP),
    ):
        (mappings / name).write_text(text.format(reference=REFERENCE))
        update_checksum(str(mappings / name))
    references = folder / "references" / "jwst" / "nircam"
    references.mkdir(parents=True)
    shutil.copy(psfmask, references / REFERENCE)
    settings = folder / "config" / "jwst"
    settings.mkdir(parents=True)
    (settings / "server_config").write_text(repr(SERVER_CONFIG))
    return folder


@pytest.fixture
def offline(tmp_path, observation_dir) -> dict:
    """The environment of a run that uses the CRDS cache above and no server: a port
    nothing listens on, as a compute node without network sees CRDS."""
    cache = crds_cache(tmp_path / "crds_cache", observation_dir / "psfmask.fits")
    environment = {
        **os.environ,
        "CRDS_PATH": str(cache),
        "CRDS_SERVER_URL": "https://127.0.0.1:9",
        "DASK_CORON_DASK__ALIGN_REFS__PSFMASK": "crds",
    }
    return environment


def run(environment: dict, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coron_dask.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=300,
    )


def test_crds_parameters_are_those_of_the_rules(observation_dir):
    header = fits.getheader(next(observation_dir.glob("jw01386001*_calints.fits")))
    parameters = crds_parameters(dict(header))
    assert parameters["META.INSTRUMENT.NAME"] == "NIRCAM"
    assert parameters["META.INSTRUMENT.CORONAGRAPH"] == "MASKA335R"
    assert parameters["META.SUBARRAY.NAME"] == "GENERIC"
    assert parameters["META.OBSERVATION.DATE"] == "2023-06-01"


def test_psfmask_from_a_crds_cache(asn, observation_dir, offline, tmp_path):
    """Without --psfmask the run takes the PSFMASK the CRDS rules give for the science
    header, from the cache, says so, records it, and makes the products a run given that
    file makes."""
    given = run_cli(
        "run",
        asn,
        "-o",
        tmp_path / "given",
        "--psfmask",
        observation_dir / "psfmask.fits",
        "--scheduler",
        "synchronous",
        "--no-progress",
        "--skip",
        "resample",
    )
    assert given.returncode == 0, given.stderr
    found = run(
        offline,
        "run",
        asn,
        "-o",
        tmp_path / "crds",
        "--scheduler",
        "synchronous",
        "--no-progress",
        "--skip",
        "resample",
    )
    assert found.returncode == 0, found.stderr
    assert f"PSFMASK {REFERENCE} from CRDS" in found.stderr
    psfsub = next((tmp_path / "crds").glob("*_psfsub.fits"))
    assert fits.getheader(psfsub)["R_PSFMAS"] == REFERENCE
    assert_same_products(tmp_path / "crds", tmp_path / "given")


def test_no_crds_is_one_line(asn, offline, tmp_path):
    """A cache that lacks the rules and a server that does not answer: one line naming
    the exposure, saying CRDS gave nothing and how to give --psfmask; exit 2, no product."""
    offline["CRDS_PATH"] = str(tmp_path / "empty_cache")
    result = run(offline, "run", asn, "-o", tmp_path / "out", "--scheduler", "synchronous")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("coron-dask: error: ") and "_calints.fits" in lines[0]
    assert "CRDS" in lines[0] and "--psfmask FILE" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
