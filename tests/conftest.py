"""Shared fixtures: a small simulated observation, a busier one with its products, and a guard
that counts dask computes; the lanes' markers (tests/README.md); a temporary folder of the
session's own for everything the tests, their subprocesses, workers and notebooks write."""

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs without --psfmask weigh every pixel 1 instead of asking CRDS (this process and the
# commands it starts): tests/test_reference_files.py asks a CRDS cache of its own.
os.environ["DASK_CORON_DASK__ALIGN_REFS__PSFMASK"] = "none"

import dask
import pytest

dask.config.refresh()

from coron_dask import run_coron3  # noqa: E402
from coron_dask.science.simulate import simulate  # noqa: E402

#: The session's temporary folder: TMPDIR for this process and all it starts (pytest's own
#: tmp_path folders, LocalCluster workers' spill space, the notebooks' kernels, hypothesis's
#: cache), removed at the end, kept (and named) when a test failed.
_TMP: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    root = Path(tempfile.mkdtemp(prefix="coron-dask-tests-"))
    # traversable by other users (the SLURM sandbox's munge socket lies below), not listable
    root.chmod(0o711)
    _TMP.update(root=root, tmpdir=os.environ.get("TMPDIR"), tempdir=tempfile.tempdir)
    os.environ["TMPDIR"] = str(root)
    tempfile.tempdir = str(root)
    os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(root / "hypothesis")


def pytest_unconfigure(config: pytest.Config) -> None:
    root = _TMP.get("root")
    if root is None:
        return
    tempfile.tempdir = _TMP["tempdir"]
    if _TMP["tmpdir"] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = _TMP["tmpdir"]
    if not _TMP.get("failed"):
        shutil.rmtree(root, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _TMP["failed"] = exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:
    if _TMP.get("failed") and _TMP.get("root"):
        terminalreporter.write_line(f"the tests' temporary files are kept in {_TMP['root']}")


#: The lanes (tests/README.md): the markers of a module's tests, of a test (whatever its
#: parameters) and of the tests that use a fixture, from what each test starts (a
#: LocalCluster, a scheduler or workers, in process or in a command it runs) and from
#: durations measured with --durations=0 (slow: about 3 s or more on 2 idle cores). The
#: notebooks (nbmake) are "notebook".
LANES = {
    "tests/test_slurm.py": "slurm cluster slow",
    "tests/test_cluster.py": "cluster slow",
    "tests/test_shared_filesystem.py::test_a_worker_that_sees_another_folder_is_refused": (
        "cluster slow"
    ),
    "tests/test_shared_filesystem.py::"
    "test_a_worker_that_joins_during_the_run_and_sees_another_folder_fails_it": "cluster slow",
    "tests/test_shared_filesystem.py::test_workers_that_share_the_folder_by_bind_mounts": (
        "cluster slow"
    ),
    "tests/test_memory.py::test_model_bounds_measured_peak": "memory cluster slow",
    "tests/test_memory.py::"
    "test_planned_companion_windows_stay_under_the_prediction_and_the_limit": (
        "memory cluster slow"
    ),
    "tests/test_dashboard.py::test_dashboard_shows_the_steps_in_a_browser": "browser cluster slow",
    "tests/test_batch_scripts.py::test_batch_script_plans_only_after_its_workers_joined": (
        "cluster slow"
    ),
    "tests/test_batch_scripts.py::test_workers_that_never_join_are_one_clear_error": "cluster",
    "tests/test_batch_scripts.py::test_cli_wait_for_workers_fails_in_one_line": "cluster",
    "tests/test_batch_scripts.py::test_a_wait_for_batch_jobs_says_what_the_queue_says": "cluster",
    "tests/test_cli.py::test_run_in_process_never_imports_distributed": "cluster slow",
    "tests/test_cli.py::test_impossible_plan_is_refused_before_any_task": "cluster slow",
    "tests/test_cli.py::test_entry_point_exit_code": "slow",
    "tests/runtime/test_allocation.py::test_default_local_cluster_under_taskset_has_one_worker": (
        "cluster slow"
    ),
    "tests/runtime/test_allocation.py::test_a_slurm_jobs_run_has_its_one_worker_of_3_gib": (
        "cluster slow"
    ),
    "tests/test_endings.py::test_signals_end_the_run_cleanly": "slow",
    "tests/test_endings.py::"
    "test_a_signal_lost_where_python_ignores_exceptions_still_ends_the_run": "slow",
    "tests/test_endings.py::test_scheduler_that_does_not_answer": "cluster",
    "tests/test_endings.py::test_scheduler_file_that_never_appears": "cluster",
    "tests/test_pipeline.py::test_same_products_for_any_chunks_and_scheduler": "cluster slow",
    "tests/test_pipeline.py::test_first_mode_aligns_each_block_once": "cluster",
    "tests/test_pipeline.py::test_no_task_hands_on_a_block_of_references": "cluster",
    "tests/test_reference_files.py::test_psfmask_from_a_crds_cache": "cluster",
    "tests/test_reference_files.py::test_no_crds_is_one_line": "cluster",
    "tests/test_pipeline.py::test_miri_4qpm_matches_jwst_functions": "slow",
    "tests/test_companions_pyklip.py": "slow",
    "tests/test_companions_adi.py::test_walkers_spread_over_workers_give_the_same_chain": (
        "cluster slow"
    ),
    "tests/test_companions_session.py::"
    "test_the_windows_and_the_residual_are_computed_on_the_runs_own_cluster": "cluster slow",
    "tests/test_windows_plan.py": "slow",
    "tests/test_pipeline.py::test_truncated_klip_error_matches_jwst": "slow",
    "tests/test_pipeline.py::test_each_plane_of_the_kl_mode_cube_is_a_single_truncation_run": (
        "slow"
    ),
    "tests/test_plots.py::test_zarr_products_plot_as_fits_do": "slow",
    "tests/io/test_open_cost.py::test_a_368_mb_psfalign_opens_in_under_50_mb": "slow",
    "tests/test_config.py::test_environment_variable_overrides": "slow",
    "tests/test_photometry.py::test_snr_map_large_image_spot_checks": "slow",
    "tests/test_detection.py::test_the_companion_is_the_one_candidate_at_its_place": "slow",
    "tests/test_cli.py::test_demo_with_several_kl_cutoffs": "slow",
    "tests/test_cli.py::test_demo_failing_after_its_run_says_its_products_are_on_disk": "slow",
    "tests/test_endings.py::test_a_failure_while_placing_takes_back_every_product": "slow",
    "tests/test_inputs.py::test_cutoffs_above_the_references_are_their_number": "slow",
    "tests/test_inputs.py::test_a_reference_that_cannot_be_fitted_is_flagged_and_left_out": "slow",
    "tests/test_companions.py::"
    "test_a_companion_behind_the_occulter_is_fitted_through_its_transmission": "slow",
    # each runs the pipeline two or three times (the io-level tests are fast)
    "tests/test_resume.py": "slow",
    "tests/test_resume.py::test_sigkill_part_way_then_the_same_command_finishes_bit_identical": (
        "cluster"
    ),
}
#: Fixtures that make a test slow: several runs (``swept``: eight; ``zoned``: five, KLIP in
#: zones; a contrast curve, two behind an occulter; the runs the alignment record and the
#: quicklook plots are read from, ADI+RDI in zones among them; four companions simulated,
#: reduced and fitted) or a busy one.
SLOW_FIXTURES = {
    *("swept", "zoned", "busy_baseline", "curve", "occulted", "runs", "adi_run", "recovered"),
    *("fitted_cli", "recovered_adi", "fitted_session"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        nodeid = item.nodeid.split("[")[0]
        names = set(LANES.get(nodeid.split("::")[0], "").split() + LANES.get(nodeid, "").split())
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            names.add("slow")
        if item.nodeid.split("::")[0].endswith(".ipynb"):
            names |= {"notebook", "slow"}
        for name in sorted(names):
            item.add_marker(name)


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
