"""Every way a run ends is the same clean end: one line on stderr, its own exit code, no
traceback (unless --debug), no product (a signal keeps what was written, hidden, for the
same run again to take up: tests/test_resume.py), no worker process left; options that
cannot apply are refused before any cluster starts; waits say what they wait for."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import dask
import numpy as np
import psutil
import pytest

from coron_dask import __version__
from coron_dask.runtime import deploy

# dask-jobqueue adds its defaults to dask's configuration when imported: imported here, so
# that the tests' dask.config.set of jobqueue keys restores them, and does not drop them all
pytest.importorskip("dask_jobqueue")
from tests.conftest import assert_same_products, run_main, start_cli


def error_line(err: str) -> str:
    """The one line a failed command ends with; nothing that looks like a traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("coron-dask: error: "), err
    assert sum(line.startswith("coron-dask: error: ") for line in lines) == 1, err
    return lines[-1]


@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if a cluster (or a connection to one) is started."""

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(deploy.Cluster, "__init__", refuse)


@pytest.mark.parametrize(
    ("options", "named", "problem"),
    [
        (["--memory-limit", "lots"], "--memory-limit", "cannot read 'lots' as a size"),
        (["--memory-limit", "0"], "--memory-limit", "must be more than 0"),
        (
            ["--memory-limit", "100TiB", "--n-workers", "4"],
            "--memory-limit",
            "4 worker(s) × 100TiB is more than the ",
        ),
        (["--bad-bits", "FOO"], "--bad-bits", "no DQ flag is named 'FOO'"),
        (["--scheduler", "threads", "--report", "r.html"], "--report", "needs a distributed"),
        (["--scheduler", "tcp://127.0.0.1:1", "--n-workers", "2"], "--n-workers", "sizes the"),
        (["--jobs", "2"], "--jobs", "sizes batch jobs of --cluster slurm or pbs"),
        (["--wait-for-workers", "2"], "--wait-for-workers", "has its workers when it starts"),
        (
            ["--scheduler", "tcp://127.0.0.1:1", "--scheduler-file", "s.json"],
            "--scheduler-file",
            "either --scheduler or --scheduler-file",
        ),
        (["--scheduler-file", "/nope/s.json"], "/nope/s.json", "its folder does not exist"),
        (["--cluster", "slurm"], "--cluster slurm", "cluster/jobqueue.yaml"),
        (["--stats", "/nope/stats.json"], "/nope/stats.json", "does not exist or is not writable"),
    ],
)
def test_options_refused_before_any_cluster(
    options, named, problem, asn, tmp_path, capsys, no_cluster
):
    out = tmp_path / "out"
    with dask.config.set({"jobqueue.slurm.cores": None, "jobqueue.slurm.memory": None}):
        code, _, err = run_main(["run", asn, "-o", out, *options], capsys)
    assert code == 2
    assert err.strip().splitlines() == [error_line(err)]
    assert named in err and problem in err
    assert not out.exists()


def test_output_path_that_is_a_file(asn, tmp_path, capsys, no_cluster):
    (tmp_path / "taken").write_text("")
    code, _, err = run_main(["run", asn, "-o", tmp_path / "taken" / "out"], capsys)
    assert code == 2
    assert (
        error_line(err)
        == f"coron-dask: error: {tmp_path / 'taken'}: is a file: products go in a folder"
    )


def test_jobqueue_script_without_configuration(capsys):
    with dask.config.set({"jobqueue.pbs.cores": None, "jobqueue.pbs.memory": None}):
        code, _, err = run_main(["cluster", "pbs"], capsys)
    assert code == 2
    assert "cluster/jobqueue.yaml" in error_line(err)


def test_version(capsys):
    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"coron-dask {__version__}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_scheduler_that_does_not_answer(asn, tmp_path, capsys):
    address = f"tcp://127.0.0.1:{_free_port()}"
    with dask.config.set({"coron_dask.cluster.scheduler-timeout": 2}):
        start = time.monotonic()
        code, _, err = run_main(
            ["run", asn, "-o", tmp_path / "out", "--scheduler", address], capsys
        )
    assert code == 3
    assert error_line(err) == (
        f"coron-dask: error: cluster: no scheduler answered at {address} within 2 s "
        "(--scheduler, coron_dask.cluster.scheduler-timeout); no product was written"
    )
    assert f"connecting to the scheduler at {address} (up to 2 s)" in err  # said while waiting
    assert time.monotonic() - start < 30


def test_scheduler_file_that_never_appears(asn, tmp_path, capsys):
    path = tmp_path / "scheduler.json"
    with dask.config.set({"coron_dask.cluster.scheduler-timeout": 1}):
        code, _, err = run_main(
            ["run", asn, "-o", tmp_path / "out", "--scheduler-file", path], capsys
        )
    assert code == 3
    assert f"waiting up to 1 s for the scheduler file {path}" in err
    assert error_line(err).startswith(
        f"coron-dask: error: cluster: {path}: no scheduler wrote its address there within 1 s"
    )


def test_a_signal_ends_the_wait_for_a_scheduler(asn, tmp_path):
    """SIGTERM while the run waits (up to a minute) for a scheduler file that a batch
    script's scheduler has not written yet: the wait ends at once, as any run ends on a
    signal, not when its timeout runs out."""
    out, path = tmp_path / "out", tmp_path / "scheduler.json"
    command = [sys.executable, "-m", "coron_dask.cli", "run", asn, "-o", out]
    environ = {**os.environ, "DASK_CORON_DASK__CLUSTER__SCHEDULER_TIMEOUT": "60"}
    process = subprocess.Popen(
        [*command, "--scheduler-file", path], stderr=subprocess.PIPE, text=True, env=environ
    )
    err = ""
    try:
        while "waiting up to" not in err:  # a line at a time, as the run logs them
            line = process.stderr.readline()
            assert line, f"the run ended before it waited: {err}"
            err += line
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        waited = time.monotonic() - start
    finally:
        process.kill()
    err += process.stderr.read()
    assert code == 143, err
    assert waited < 5, waited
    assert error_line(err) == "coron-dask: error: stopped by SIGTERM; no product was written"
    assert not out.exists()


def test_unexpected_error_is_one_line_and_debug_shows_where(asn, tmp_path, capsys, monkeypatch):
    from coron_dask.pipeline import build as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline, "build_products", broken)
    options = ["run", asn, "-o", tmp_path / "out", "--scheduler", "synchronous"]
    code, _, err = run_main(options, capsys)
    assert code == 1
    assert error_line(err) == (
        "coron-dask: error: unexpected RuntimeError: a bug; no product was written "
        "(--debug shows where)"
    )
    code, _, err = run_main([*options, "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "RuntimeError: a bug" in err


def test_stats_and_progress_lines_under_the_threaded_scheduler(asn, tmp_path, capsys):
    """--stats is honoured without a distributed cluster: task seconds per stage, as many
    fit tasks as alignment blocks; a batch log (stderr not a terminal) gets progress lines."""
    stats = tmp_path / "stats.json"
    options = ["--integrations-per-chunk", "1", "--psfs-per-chunk", "4", "--stats", stats]
    with dask.config.set({"coron_dask.cluster.status-interval": 0}):
        code, _, err = run_main(
            ["run", asn, "-o", tmp_path / "out", "--scheduler", "threads", *options], capsys
        )
    assert code == 0, err
    stages = json.loads(stats.read_text())["stages"]
    # 2 exposures × 3 integrations, 6 references in blocks of 4: 6 × 2 fit tasks
    assert stages["align_refs: shift fit"]["tasks"] == 12
    assert all(stage["seconds"] > 0 for stage in stages.values())
    progress = [line for line in err.splitlines() if " - progress: " in line]
    assert len(progress) > 3
    # the last line: every step's tasks done, every product written
    assert "progress: 100% in " in progress[-1]
    counts = progress[-1].split(": ", 2)[2].replace("; products", ",").split(", ")
    assert {"align_refs fit", "klip subtract", "write psfsub"} <= {
        c.rsplit(" ", 1)[0] for c in counts
    }
    for count in counts:
        done, total = count.rsplit(" ", 1)[1].split("/")
        assert done == total != "0", count


def test_stale_partials_of_a_killed_run(asn, tmp_path, capsys):
    """A run removes the partial products a killed run on this host left (its process is
    gone), and reports, without touching them, those of a run on another host."""
    out = tmp_path / "out"
    out.mkdir()
    name = "jw01386-c1000_t001_nircam_f410m-maskrnd-sub64_psfstack.fits"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = out / f".{name}.{socket.gethostname()}.{int(dead.stdout)}.partial"
    foreign = out / f".{name}.elsewhere.{os.getpid()}.partial"
    stale.write_bytes(b"\0" * 2880)
    foreign.write_bytes(b"\0" * 2880)
    code, _, err = run_main(["run", asn, "-o", out, "--scheduler", "synchronous"], capsys)
    assert code == 0, err
    assert not stale.exists() and f"removed {stale}, left by an earlier run" in err
    assert (
        foreign.exists()
        and f"{foreign} is being written, or was left, by a run on elsewhere" in err
    )
    assert (out / name).exists()


def stopped_line(err: str, name: str, prefix: str = "stopped by ") -> None:
    """The last line of a run stopped by ``name`` says that no product was written, and
    what it kept for the same run again to take up, if anything was written yet."""
    line = error_line(err)
    ended = f"coron-dask: error: {prefix}{name}; no product was written"
    kept = r", kept \d+ of \d+ blocks written \(.* GB\) in .*: run the same command again"
    assert line == ended or re.fullmatch(re.escape(ended) + kept + ".*", line), line


def no_product(folder: Path) -> bool:
    """No product in ``folder``: at most what a stopped run kept, hidden, to take it up."""
    return not folder.exists() or all(p.name.startswith(".") for p in folder.iterdir())


def wait_for_partials(folder: Path, process: subprocess.Popen) -> None:
    """Wait until the run has begun writing its products (no fixed sleep)."""
    deadline = time.monotonic() + 300
    while not list(folder.glob(".*.partial")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no product was begun"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("signals", "code"),
    [
        ([signal.SIGTERM], 143),  # scancel, a walltime limit: to the process
        ([signal.SIGINT], 130),  # Ctrl-C: to the terminal's whole process group
        ([signal.SIGINT, signal.SIGINT], 130),  # Ctrl-C twice
    ],
    ids=["SIGTERM", "SIGINT", "SIGINT-twice"],
)
def test_signals_end_the_run_cleanly(signals, code, busy_observation, busy_baseline, tmp_path):
    out = tmp_path / "out"
    args = ["run", busy_observation, "-o", out, "--n-workers", 2, "--integrations-per-chunk", 1]
    args += ["--psfmask", busy_observation.parent / "psfmask.fits"]
    process = start_cli(*args)
    wait_for_partials(out, process)
    workers = psutil.Process(process.pid).children(recursive=True)
    assert workers, "the LocalCluster has no worker processes"
    for number in signals:
        if number == signal.SIGINT:
            os.killpg(process.pid, number)
        else:
            process.send_signal(number)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    stopped_line(err, signal.Signals(signals[0]).name)
    assert "leaked semaphore" not in err
    assert no_product(out)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert alive == [], alive
    again = start_cli(*args)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert_same_products(out, busy_baseline)


def test_a_signal_inside_a_gc_callback_still_ends_the_run(asn, tmp_path, capsys):
    """A signal that arrives while Python runs a garbage-collection callback (distributed
    has one), where an exception would only be printed: its handler only records it, and
    the run ends between its tasks as a signal ends it, exit 130 and no product."""
    import gc

    from coron_dask.runtime import signals

    out = tmp_path / "out"
    sent = []

    def callback(phase: str, _info: dict) -> None:
        ours = signal.getsignal(signal.SIGINT) is signals.record_signal
        if phase == "start" and ours and not sent:  # once the run's handler is in place
            sent.append(True)
            signal.raise_signal(signal.SIGINT)  # its handler runs here, in the callback

    gc.callbacks.append(callback)
    try:
        code, _, err = run_main(["run", asn, "-o", out, "--scheduler", "synchronous"], capsys)
    finally:
        gc.callbacks.remove(callback)
    assert sent
    assert code == 130, err
    stopped_line(err, "SIGINT")
    assert "Exception ignored" not in err and "still cleaning up" not in err
    assert no_product(out)


def in_a_process(code: str) -> subprocess.CompletedProcess:
    """Python ``code`` run in a process of its own (signals sent to it stay there; a hang
    fails on the timeout)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("number", "code", "scheduler"),
    [(signal.SIGTERM, 143, "synchronous"), (signal.SIGINT, 130, "threads")],
    ids=["SIGTERM-synchronous", "SIGINT-threads"],
)
def test_a_signal_under_a_local_scheduler_ends_the_run_and_restores_the_handlers(
    number, code, scheduler, busy_observation, tmp_path
):
    """``main`` called from Python in a process of its own, under dask's local schedulers,
    gets a signal mid-run (sent from another thread once the products are begun): it
    returns the signal's exit code with one line, leaves no product or partial, and the
    process's handlers are its own again (what ran before main: here the defaults)."""
    out = tmp_path / "out"
    result = in_a_process(f"""
        import os, signal, sys, threading, time
        from pathlib import Path
        from coron_dask.cli.main import main
        out = Path({str(out)!r})
        before = [signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)]

        def send():
            while not list(out.glob(".*.partial")):
                time.sleep(0.01)
            os.kill(os.getpid(), {int(number)})

        threading.Thread(target=send, daemon=True).start()
        code = main(["run", {str(busy_observation)!r}, "-o", str(out), "--scheduler",
                     {scheduler!r}, "--integrations-per-chunk", "1"])
        after = [signal.getsignal(n) for n in (signal.SIGTERM, signal.SIGINT)]
        print(code, after == before)
    """)
    assert result.stdout.split() == [str(code), "True"], result.stderr
    stopped_line(result.stderr, signal.Signals(number).name)
    assert no_product(out)


def test_median_of_a_pixel_flagged_in_every_integration_is_quiet():
    """No 'All-NaN slice' RuntimeWarning from the outlier median (it showed under the
    threaded scheduler): the pixel's median is NaN, the others numpy's nanmedian."""
    from coron_dask.kernels.blocks import median_block

    rng = np.random.default_rng(3)
    sci = rng.normal(size=(5, 4, 6)).astype(np.float32)
    dq = np.zeros(sci.shape, np.uint32)
    dq[:, 2, 3] = 1
    dq[1:, 0, 0] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        median = median_block(sci, dq, 1, 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's own warns here
        expected = np.nanmedian(np.where(dq & 1, np.nan, sci), axis=0)
    np.testing.assert_array_equal(median, expected.astype(np.float32))
    assert np.isnan(median[2, 3]) and median[0, 0] == sci[0, 0, 0]


def _on_disk(folder: Path) -> list[str]:
    """Every file and folder in ``folder``, hidden ones too (partials, products set aside)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_failure_in_detection_leaves_no_product(asn, tmp_path, capsys, monkeypatch):
    """The detection map is made in the run's one computation: a failure there (after the
    i2d is computed) leaves no product at all, not the others placed before it, and the
    line says so."""
    from coron_dask.science import detection

    def broken(*args, **kwargs):
        raise RuntimeError("no map")

    monkeypatch.setattr(detection, "snr_map", broken)
    out = tmp_path / "out"
    options = ["--psfmask", asn.parent / "psfmask.fits", "--scheduler", "synchronous"]
    code, _, err = run_main(["run", asn, "-o", out, *options], capsys)
    assert code == 1, err
    assert error_line(err) == (
        "coron-dask: error: unexpected RuntimeError: no map; no product was written "
        "(--debug shows where)"
    )
    assert _on_disk(out) == []


@pytest.mark.parametrize("earlier", [False, True])
def test_a_failure_while_placing_takes_back_every_product(
    asn, tmp_path, capsys, monkeypatch, earlier
):
    """A rename that fails while the products are placed (the 3rd) takes back the two
    placed: no product of the run is on disk and the line says so; the products of an
    earlier run in the folder are as they were, nothing hidden left beside them."""
    out = tmp_path / "out"
    options = ["run", asn, "-o", out, "--psfmask", asn.parent / "psfmask.fits"]
    options += ["--scheduler", "synchronous", "--no-psfalign"]
    if earlier:
        assert run_main(options, capsys)[0] == 0
    # a file put back is the same file (its inode), not a copy
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir()} if earlier else {}
    real, renames = os.replace, []

    def failing(source, target):
        if str(source).endswith(".partial"):
            renames.append(Path(target).name)
            if len(renames) == 3:
                raise OSError(28, "No space left on device", str(target))
        real(source, target)

    monkeypatch.setattr(os, "replace", failing)
    code, _, err = run_main(options, capsys)
    assert code == 4 and len(renames) == 3, err
    assert error_line(err) == (
        f"coron-dask: error: {out / renames[2]}: No space left on device; no product was written"
    )
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in out.iterdir()} == before


def test_products_that_cannot_be_taken_back_are_named(asn, tmp_path, capsys, monkeypatch):
    """Where a product placed cannot be removed again after a failure to place the others,
    the line names it as on disk, and it is all that is."""
    out = tmp_path / "out"
    real_replace, real_unlink, renames = os.replace, Path.unlink, []

    def failing(source, target):
        if str(source).endswith(".partial"):
            renames.append(Path(target))
            if len(renames) == 3:
                raise OSError(5, "Input/output error", str(target))
        real_replace(source, target)

    def stuck(path, missing_ok=False):
        if renames and path == renames[0]:
            raise PermissionError(13, "Permission denied", str(path))
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", failing)
    monkeypatch.setattr(Path, "unlink", stuck)
    options = ["--psfmask", asn.parent / "psfmask.fits", "--scheduler", "synchronous"]
    code, _, err = run_main(["run", asn, "-o", out, *options], capsys)
    assert code == 4, err
    assert error_line(err) == (
        f"coron-dask: error: {renames[2]}: Input/output error; {renames[0].name} was "
        f"written, in {out}"
    )
    assert _on_disk(out) == [renames[0].name]
