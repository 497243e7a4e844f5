"""Shared fixtures: a small simulated observation, a busier one with its products, and a guard
that counts dask computes."""

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Runs without --psfmask weigh every pixel 1 instead of asking CRDS (this process and the
# commands it starts): tests/test_reference_files.py asks a CRDS cache of its own.
os.environ["DASK_CORON_DASK__ALIGN_REFS__PSFMASK"] = "none"

import dask
import pytest

dask.config.refresh()

from coron_dask import run_coron3  # noqa: E402
from coron_dask.science.simulate import simulate  # noqa: E402

SMALL = {"size": 64, "sci_exps": 2, "sci_ints": 3, "psf_exps": 3, "psf_ints": 2, "seed": 4}


@pytest.fixture(scope="session")
def observation_dir(tmp_path_factory) -> Path:
    """A simulated observation (never modified by tests: copy it to change it)."""
    folder = tmp_path_factory.mktemp("observation")
    simulate(folder, **SMALL)
    return folder


@pytest.fixture(scope="session")
def asn(observation_dir) -> Path:
    return next(observation_dir.glob("*_asn.json"))


#: 128² frames, two rolls, for the science outputs (contrast, detection).
BLANK = {"size": 128, "sci_exps": 2, "sci_ints": 4, "psf_exps": 5, "psf_ints": 3, "seed": 11}


@pytest.fixture(scope="session")
def blank(tmp_path_factory) -> Path:
    """A simulated observation without a companion (``BLANK``): its ASN."""
    return simulate(tmp_path_factory.mktemp("blank"), contrast=0.0, **BLANK)


@pytest.fixture(scope="session")
def busy_observation(tmp_path_factory) -> Path:
    """Large enough that a run lasts some seconds: time to kill things during it (never
    modified by tests)."""
    folder = tmp_path_factory.mktemp("busy")
    return simulate(folder, size=96, sci_exps=2, sci_ints=8, psf_exps=5, psf_ints=4, seed=7)


@pytest.fixture(scope="session")
def busy_baseline(busy_observation, tmp_path_factory) -> Path:
    """The products of ``busy_observation``, computed synchronously."""
    out = tmp_path_factory.mktemp("busy_baseline")
    run_coron3(
        busy_observation,
        out,
        psfmask=busy_observation.parent / "psfmask.fits",
        scheduler="synchronous",
        progress=False,
    )
    return out


@pytest.fixture
def observation_copy(observation_dir, tmp_path) -> Path:
    """A private copy of the observation that a test may damage."""
    target = tmp_path / "inputs"
    shutil.copytree(observation_dir, target)
    return target


class ComputeCounter:
    """A dask scheduler that counts the computations asked of it (xarray's idea)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, dsk, keys, **kwargs):
        self.count += 1
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def count_computes():
    counter = ComputeCounter()
    with dask.config.set(scheduler=counter):
        yield counter


def assert_same_products(folder: Path, baseline: Path, names: list[str] | None = None) -> None:
    """Every FITS product in ``folder`` (by default, the same ones as in ``baseline``) equals
    its namesake in ``baseline``: bit for bit, but the i2d, whose blocks add up in an order
    that follows the chunking (float32 rounding), and its detection map, made from it."""
    import numpy as np
    from astropy.io import fits

    expected = sorted(p.name for p in baseline.glob("*.fits")) if names is None else names
    assert sorted(p.name for p in folder.glob("*.fits")) == sorted(expected)
    names = expected
    for name in names:
        with fits.open(folder / name) as ours, fits.open(baseline / name) as theirs:
            for hdu in ours[1:]:
                expected = theirs[hdu.name].data
                if name.endswith(("_i2d.fits", "_snr.fits")):
                    scale = np.nanmax(np.abs(expected))
                    np.testing.assert_allclose(hdu.data, expected, rtol=1e-5, atol=1e-6 * scale)
                else:
                    np.testing.assert_array_equal(hdu.data, expected)


ROOT = Path(__file__).resolve().parents[1]


def run_main(args: list, capsys) -> tuple[int, str, str]:
    """``coron-dask`` with ``args`` in this process: exit code, stdout, stderr."""
    from coron_dask.cli.main import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def start_cli(*args: object) -> subprocess.Popen:
    """``coron-dask`` with ``args``, running in a session of its own (as a batch job or a
    terminal runs it), its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "coron_dask.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    process = start_cli(*args)
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)
