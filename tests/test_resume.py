"""A run stopped part way (SIGKILL, SIGTERM, a lost cluster) is taken up by the same command
again: the blocks written before and found intact are not made again, and the products are
bit for bit those of a run never stopped; a run of other inputs or parameters, a bug, or
``coron-dask clean`` leaves nothing of it."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from astropy.io import fits

from benchmarks.hashes import fingerprints
from coron_dask import run_coron3
from coron_dask.core.errors import Interrupted
from coron_dask.io import staging
from coron_dask.io.resume import STATE
from coron_dask.steps import align_refs
from coron_dask.steps.blocks import fit_block
from tests.conftest import run_main, start_cli

#: Blocks of one integration: many blocks, many moments to stop the run at.
OPTIONS = ["--integrations-per-chunk", "1", "--psfs-per-chunk", "3"]
REUSED = re.compile(r"resume: reusing (\d+) of (\d+) blocks written before")
KEPT = re.compile(
    r"^coron-dask: error: stopped by (SIG\w+); no product was written, kept (\d+) of (\d+) "
    r"blocks written \([\d.e+-]+ GB\) in (.+): run the same command again to resume, or "
    r"`coron-dask clean (.+)` to remove them$"
)


@pytest.fixture(scope="module")
def uninterrupted(asn, tmp_path_factory) -> tuple[Path, dict]:
    """The products of a run never stopped, with OPTIONS, and its --stats."""
    out = tmp_path_factory.mktemp("uninterrupted")
    stats = out.parent / f"{out.name}-stats.json"
    run_coron3(
        asn, out, scheduler="synchronous", integrations=1, psfs=3, progress=False, stats=stats
    )
    return out, json.loads(stats.read_text())


def records(out: Path, extension: str = "*") -> int:
    """How many blocks the run into ``out`` recorded as written (of ``extension``)."""
    blocks = out / STATE / "blocks"
    return sum(
        1 for item in blocks.glob(f"*/{extension}/*") if item.is_file() and "." not in item.name
    )


def hidden(out: Path) -> list[str]:
    return sorted(item.name for item in out.iterdir() if item.name.startswith("."))


def stop_part_way(args: list, out: Path, number: int, fits: int) -> tuple[int, str]:
    """Start ``coron-dask`` with ``args``; send it signal ``number`` once the fitted shifts
    of ``fits`` alignment blocks are recorded: its exit code and stderr."""
    process = start_cli(*args)
    deadline = time.monotonic() + 300
    try:
        while records(out, "FIT") < fits:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no block was recorded"
            time.sleep(0.005)
        os.kill(process.pid, number)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    return process.returncode, err


def reuse_counts(err: str) -> tuple[int, int, dict[str, tuple[int, int]]]:
    """The blocks a run reused, of how many, and by kind of product and extension, as its
    log says; the sums checked."""
    line = next(line for line in err.splitlines() if REUSED.search(line))
    reused, total = map(int, REUSED.search(line).groups())
    kinds = {
        name: tuple(map(int, counts.split("/")))
        for name, counts in (part.rsplit(" ", 1) for part in line.split("(", 1)[1][:-1].split(", "))
    }
    assert sum(k for k, _ in kinds.values()) == reused
    assert sum(n for _, n in kinds.values()) == total
    return reused, total, kinds


def test_sigkill_part_way_then_the_same_command_finishes_bit_identical(
    asn, uninterrupted, tmp_path
):
    """SIGKILL (no handler runs) of a LocalCluster run once some references are aligned:
    the partials and records stay; the same command again reuses every block recorded,
    fitted shifts among them, and gives the products of the run never stopped, bit for bit
    (the run's date aside)."""
    baseline, _ = uninterrupted
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--n-workers", "2", *OPTIONS]
    code, err = stop_part_way(args, out, signal.SIGKILL, 4)
    assert code == -signal.SIGKILL, err
    assert f".{next(baseline.glob('*_psfsub.fits')).name}.partial" in hidden(out)
    before = records(out)
    process = start_cli(*args)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    reused, total, kinds = reuse_counts(err)
    assert reused == before and 0 < reused < total
    assert kinds["fits FIT"][0] >= 4
    assert hidden(out) == []  # the state and the partial files are gone
    assert fingerprints(out) == fingerprints(baseline)


def test_sigterm_part_way_says_what_it_kept_and_the_same_command_finishes(
    asn, uninterrupted, tmp_path, monkeypatch, capsys
):
    """SIGTERM (scancel, a walltime): exit 143; the last line says how many blocks were
    kept and how to resume or remove them; the same command (here in this process, its
    fits counted) fits only the blocks not fitted before, and finishes bit-identical."""
    baseline, stats = uninterrupted
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--scheduler", "synchronous", *OPTIONS]
    code, err = stop_part_way(args, out, signal.SIGTERM, 4)
    assert code == 143, err
    line = err.strip().splitlines()[-1]
    match = KEPT.match(line)
    assert match, line
    name, kept, total, where, clean = match.groups()
    assert name == "SIGTERM" and where == clean == str(out)
    assert int(kept) == records(out) and 0 < int(kept) < int(total)
    fitted = []

    def counted(science, *args, **kwargs):
        if science.size:  # not dask's call on empty blocks for the output's type
            fitted.append(science.shape)
        return fit_block(science, *args, **kwargs)

    monkeypatch.setattr(align_refs, "fit_block", counted)
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    reused, blocks, kinds = reuse_counts(err)
    assert (reused, blocks) == (int(kept), int(total))
    fits, every = kinds["fits FIT"]
    assert every == stats["stages"]["align_refs: shift fit"]["tasks"]  # one per fit block
    assert fits >= 4 and len(fitted) == every - fits
    assert hidden(out) == []
    assert fingerprints(out) == fingerprints(baseline)


def interrupted_before_placing(monkeypatch, args: list, capsys) -> str:
    """Run ``coron-dask`` in this process, ended by SIGTERM once every block is written,
    before the products are placed (a walltime at the last moment): its last line."""

    def stopped() -> None:
        raise Interrupted(signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(staging, "raise_if_stopped", stopped)
        code, _, err = run_main(args, capsys)
    assert code == 143, err
    return err.strip().splitlines()[-1]


def test_a_damaged_block_is_written_again(asn, uninterrupted, tmp_path, monkeypatch, capsys):
    """A block whose bytes no longer match its record (a node lost before the page cache
    reached the disk) is made again; all others are reused."""
    baseline, _ = uninterrupted
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--scheduler", "synchronous", *OPTIONS]
    last = interrupted_before_placing(monkeypatch, args, capsys)
    kept, total = map(int, KEPT.match(last).groups()[1:3])
    assert kept == total == records(out)
    partial = out / f".{next(baseline.glob('*_psfsub.fits')).name}.partial"
    with fits.open(partial) as hdul:
        where = hdul.fileinfo(hdul.index_of("SCI"))["datLoc"]
    with open(partial, "r+b") as handle:
        handle.seek(where)
        handle.write(b"\x7f\xc0\x00\x01")  # a NaN where a value was
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert "psfsub.fits SCI: 1 recorded block(s) differ from the file: written again" in err
    reused, blocks, _ = reuse_counts(err)
    assert (reused, blocks) == (total - 1, total)
    assert fingerprints(out) == fingerprints(baseline)


def test_zone_means_recorded_are_handed_on_again(asn, tmp_path, monkeypatch, capsys):
    """KLIP in zones: the aligned blocks' write hands on their zone means (a row a frame);
    a psfsub block made again reads the psfalign blocks reused and takes their zone means
    from the records: the products are those of a run never stopped."""
    zones = ["--annuli", "2", "--subsections", "3", "--iwa", "2"]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = ["run", asn, "--scheduler", "synchronous", *OPTIONS, *zones]
    last = interrupted_before_placing(monkeypatch, [*args, "-o", out], capsys)
    kept, total = map(int, KEPT.match(last).groups()[1:3])
    assert kept == total  # every block written, none placed
    partial = next(out.glob(".*_psfsub.fits.partial"))
    with fits.open(partial) as hdul:
        where = hdul.fileinfo(hdul.index_of("SCI"))["datLoc"]
    with open(partial, "r+b") as handle:
        handle.seek(where + 4 * 64 * 20)  # a pixel in a zone of the first block
        handle.write(b"\x7f\xc0\x00\x01")
    code, _, err = run_main([*args, "-o", out], capsys)
    assert code == 0, err
    assert (reuse_counts(err)[:2]) == (total - 1, total)
    code, _, err = run_main([*args, "-o", fresh], capsys)
    assert code == 0, err
    assert fingerprints(out) == fingerprints(fresh)


def test_other_parameters_never_reuse_and_remove_the_state(asn, tmp_path, monkeypatch, capsys):
    """A run with another parameter into the folder of a stopped run: nothing reused, the
    stopped run's files removed (said), the products those of that run made afresh."""
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--scheduler", "synchronous", *OPTIONS]
    interrupted_before_placing(monkeypatch, args, capsys)
    assert records(out) > 0
    code, _, err = run_main([*args, "--truncate", "2"], capsys)
    assert code == 0, err
    assert "removed what an earlier run with other inputs, parameters or code left" in err
    assert "resume: reusing" not in err
    assert hidden(out) == []
    fresh = tmp_path / "fresh"
    code, _, err = run_main(
        ["run", asn, "-o", fresh, "--scheduler", "synchronous", *OPTIONS, "--truncate", "2"], capsys
    )
    assert code == 0, err
    assert fingerprints(out) == fingerprints(fresh)


#: ADI+RDI in two annuli, the references chosen per integration and zone: the blocks of
#: psfalign hold the other roll's integrations, psfsub's the choice (REFS, REFCORR).
ADI = ["--mode", "ADI+RDI", "--annuli", "2", "--movement", "1", "--maxnumbasis", "6"]
ADI += ["--truncate", "2,4"]


def test_adi_rdi_stopped_part_way_is_taken_up_bit_identical(asn, tmp_path, capsys):
    """ADI+RDI in zones with a choice of references, stopped by SIGTERM once some
    alignment blocks are fitted: the same command reuses the blocks written (fits among
    them) and gives the products of a run never stopped, bit for bit."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = ["run", asn, "--scheduler", "synchronous", *OPTIONS, *ADI]
    code, err = stop_part_way([*args, "-o", out], out, signal.SIGTERM, 4)
    assert code == 143, err
    kept, total = map(int, KEPT.match(err.strip().splitlines()[-1]).groups()[1:3])
    assert 0 < kept < total
    code, _, err = run_main([*args, "-o", out], capsys)
    assert code == 0, err
    reused, blocks, kinds = reuse_counts(err)
    assert (reused, blocks) == (kept, total)
    assert kinds["fits FIT"][0] >= 4
    assert hidden(out) == []
    code, _, err = run_main([*args, "-o", fresh], capsys)
    assert code == 0, err
    with fits.open(next(fresh.glob("*_psfsub.fits"))) as hdul:
        assert hdul[0].header["KLIPMODE"] == "ADI+RDI" and "REFS" in hdul
    assert fingerprints(out) == fingerprints(fresh)


@pytest.mark.parametrize("changed", ["--mode ADI", "--movement 2"])
def test_a_different_reduction_never_reuses(changed, asn, tmp_path, monkeypatch, capsys):
    """A stopped ADI+RDI run, then one of another mode or movement into its folder: nothing
    of it reused. Another movement keeps every product's shape and blocks (only which
    references each zone keeps changes): only the run's fingerprint (its MOVEMENT keyword)
    tells the two apart."""
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--scheduler", "synchronous", *OPTIONS, *ADI]
    interrupted_before_placing(monkeypatch, args, capsys)
    assert records(out) > 0
    code, _, err = run_main([*args, *changed.split()], capsys)
    assert code == 0, err
    assert "removed what an earlier run with other inputs, parameters or code left" in err
    assert "resume: reusing" not in err
    assert hidden(out) == []


def test_an_input_changed_is_not_reused(observation_copy, tmp_path, monkeypatch, capsys):
    """A member exposure touched after the run stopped (its modification time): the run
    starts over."""
    asn = next(observation_copy.glob("*_asn.json"))
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--scheduler", "synchronous", *OPTIONS]
    interrupted_before_placing(monkeypatch, args, capsys)
    member = next(observation_copy.glob("*_calints.fits"))
    os.utime(member, ns=(member.stat().st_atime_ns, member.stat().st_mtime_ns + 10**9))
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert "removed what an earlier run" in err and "resume: reusing" not in err


def test_clean_removes_what_a_stopped_run_kept(asn, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--scheduler", "synchronous", *OPTIONS]
    last = interrupted_before_placing(monkeypatch, args, capsys)
    kept = int(KEPT.match(last).group(2))
    partials = [out / name for name in hidden(out) if name.endswith(".partial")]
    assert partials and STATE in hidden(out)
    size = sum(path.stat().st_blocks * 512 for path in partials) / 1e9  # on disk
    code, printed, err = run_main(["clean", out], capsys)
    assert code == 0, err
    assert printed.strip() == (
        f"{out}: removed {len(partials)} partial file(s) ({size:.3g} GB) and the records "
        f"of {kept} block(s)"
    )
    assert list(out.iterdir()) == []
    code, printed, _ = run_main(["clean", out], capsys)
    assert code == 0 and printed.strip() == f"{out}: nothing to clean"


def test_a_bug_part_way_leaves_nothing(asn, tmp_path, monkeypatch, capsys):
    """An exception other than a signal (a bug, bad data found late) after some blocks
    were written and recorded: no product, no partial, no state."""
    out = tmp_path / "out"
    store, calls = staging.store_block, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise RuntimeError("a bug")
        return store(*args, **kwargs)

    monkeypatch.setattr(staging, "store_block", broken)
    code, _, err = run_main(["run", asn, "-o", out, "--scheduler", "synchronous", *OPTIONS], capsys)
    assert code == 1, err
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("coron-dask: error: unexpected RuntimeError: a bug; no product was written")
    )
    assert len(calls) > 10 and list(out.iterdir()) == []


def test_a_second_run_into_the_same_folder_is_refused(asn, tmp_path, capsys):
    """Two runs at once never share a folder's state: the second is refused in one line,
    naming the run that holds it; the first's files are left alone."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from coron_dask.io.resume import ResumeState; "
            f"state = ResumeState({str(out)!r}); state.lock(); print('locked', flush=True); "
            "time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / ".x.fits.partial").write_bytes(b"\0" * 2880)
        code, _, err = run_main(["run", asn, "-o", out, "--scheduler", "synchronous"], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2, err
    assert err.strip().splitlines()[-1] == (
        f"coron-dask: error: {out}: another coron-dask run (host {os.uname().nodename}, "
        f"process {holder.pid}) is writing here: wait for it to end, or give another output "
        "folder"
    )
    assert (out / ".x.fits.partial").exists()


def test_zarr_stores_are_taken_up_too(asn, tmp_path, monkeypatch, capsys):
    """Products as Zarr stores: the blocks found in a stopped run's stores are reused, and
    the stores are those of a run never stopped."""
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    args = ["run", asn, "--scheduler", "synchronous", "--format", "zarr", *OPTIONS]
    interrupted_before_placing(monkeypatch, [*args, "-o", out], capsys)
    code, _, err = run_main([*args, "-o", out], capsys)
    assert code == 0, err
    reused, total, kinds = reuse_counts(err)
    assert 0 < reused < total  # a table in a store is made again
    assert kinds["psfsub SCI"][0] == kinds["psfsub SCI"][1] > 0
    code, _, err = run_main([*args, "-o", fresh], capsys)
    assert code == 0, err
    assert fingerprints(out) == fingerprints(fresh)
    assert hidden(out) == []
