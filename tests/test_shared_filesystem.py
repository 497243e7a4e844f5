"""One shared filesystem, checked: dask workers started in mount namespaces of their own
(``unshare -m``), one that sees another folder at the output folder's path (a tmpfs over its
parent) and two that see the real folder through a bind mount, as nodes of a cluster see a
shared filesystem or their own disks. The namespaces, and their mounts, die with the
workers."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.hashes import fingerprints
from tests.conftest import run_cli, start_cli

DASK = str(Path(sys.executable).parent / "dask")


def _namespaces_permitted(folder: Path) -> bool:
    """Whether this process may make a mount namespace of its own and mount a tmpfs in it."""
    folder.mkdir()
    try:
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", folder],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        folder.rmdir()
    return done.returncode == 0


@pytest.fixture
def namespaces(tmp_path):
    if not _namespaces_permitted(tmp_path / "probe"):
        pytest.skip("unshare -m (a mount namespace, a tmpfs in it) is not permitted here")


class Cluster:
    """``dask scheduler`` on 127.0.0.1 and ``dask worker`` processes, each started in a
    session of its own (ended as a group), some in mount namespaces of their own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.scheduler_file = folder / "scheduler.json"
        self.processes: list[subprocess.Popen] = []
        scheduler = ["--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0"]
        self._start([DASK, "scheduler", *scheduler, "--scheduler-file", str(self.scheduler_file)])
        deadline = time.monotonic() + 60
        while not self.scheduler_file.exists() or not self.scheduler_file.read_text().strip():
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.1)

    def _start(self, command: list[str]) -> None:
        self.processes.append(
            subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def worker(self, name: str, mounts: str = "") -> None:
        """A worker named ``name``; ``mounts``: shell commands run first, in a mount
        namespace of the worker's own."""
        local = self.folder / name
        local.mkdir()
        command = [DASK, "worker", "--scheduler-file", str(self.scheduler_file), "--name", name]
        command += ["--nthreads", "1", "--memory-limit", "1GiB", "--host", "127.0.0.1"]
        command += ["--local-directory", str(local)]
        if mounts:
            script = f"{mounts} && exec {shlex.join(command)}"
            command = ["unshare", "-m", "--propagation", "private", "sh", "-ec", script]
        self._start(command)

    def addresses(self, count: int) -> dict[str, str]:
        """Each worker's address by name, once ``count`` workers joined."""
        from distributed import Client

        address = json.loads(self.scheduler_file.read_text())["address"]
        with Client(address, timeout=60, set_as_default=False) as client:
            client.wait_for_workers(count, timeout=120)
            info = client.scheduler_info(n_workers=-1)["workers"]
        return {worker["name"]: address for address, worker in info.items()}

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def cluster(namespaces, tmp_path):
    started = Cluster(tmp_path / "cluster")
    yield started
    started.stop()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()  # none leaked


def test_a_worker_that_sees_another_folder_is_refused(cluster, asn, observation_dir, tmp_path):
    """A worker whose mount namespace has a tmpfs over the output folder's parent sees no
    output folder: the run exits 2 before anything is computed, in one line naming that
    worker (address and host) and no other, and leaves nothing on disk."""
    parent = tmp_path / "shared"
    parent.mkdir()
    out = parent / "products"  # made by the run, for the check
    cluster.worker("sees-it")
    cluster.worker("own-disk", f"mount -t tmpfs tmpfs {shlex.quote(str(parent))}")
    addresses = cluster.addresses(2)
    done = run_cli(
        "run",
        asn,
        "-o",
        out,
        "--psfmask",
        observation_dir / "psfmask.fits",
        "--scheduler-file",
        cluster.scheduler_file,
        "--wait-for-workers",
        2,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"coron-dask: error: {out}: the output folder is not seen"), last
    assert "by 1 of 2 workers" in last
    assert f"{addresses['own-disk']} on {socket.gethostname()}: no such folder" in last
    assert addresses["sees-it"] not in last
    assert "block plan" not in done.stderr  # refused before the products were built
    assert list(parent.iterdir()) == []  # no products, partials, token, nor the folder


def test_a_worker_that_joins_during_the_run_and_sees_another_folder_fails_it(
    cluster, busy_observation, tmp_path
):
    """A worker that joins once the run computes (as an adaptive jobqueue cluster's do) and
    sees no output folder fails the run (exit 3) in one line naming it; no product is
    written. The first worker is held (SIGSTOP) while the second joins, so that the run
    cannot end before it."""
    from distributed import Client

    parent = tmp_path / "shared"
    parent.mkdir()
    out = parent / "products"
    cluster.worker("sees-it")
    cluster.addresses(1)
    address = json.loads(cluster.scheduler_file.read_text())["address"]
    run = start_cli(
        "run",
        busy_observation,
        "-o",
        out,
        "--psfmask",
        busy_observation.parent / "psfmask.fits",
        "--scheduler-file",
        cluster.scheduler_file,
        "--integrations-per-chunk",
        1,
    )
    with Client(address, timeout=60, set_as_default=False) as client:
        deadline = time.monotonic() + 300
        while not any(client.processing().values()):  # the run computes
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
            time.sleep(0.05)
        (pid,) = client.run(os.getpid).values()
    os.kill(pid, signal.SIGSTOP)
    try:
        cluster.worker("joins-late", f"mount -t tmpfs tmpfs {shlex.quote(str(parent))}")
        late = cluster.addresses(2)["joins-late"]
    finally:
        os.kill(pid, signal.SIGCONT)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 3, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last == (
        f"coron-dask: error: cluster: {out}: the output folder is not seen at this path by 1 "
        f"worker that joined during the run: {late} on {socket.gethostname()}: no such folder "
        "(the client's token file is not there); no product was written"
    )
    assert list(parent.iterdir()) == []


def test_workers_that_share_the_folder_by_bind_mounts(cluster, asn, observation_dir, tmp_path):
    """Two workers, each in a mount namespace where the output folder's parent is a tmpfs
    and the folder itself is bind-mounted back at its path, write the same products (data
    and headers, but the date) as a LocalCluster of two such workers."""
    parent = tmp_path / "shared"
    out = parent / "products"
    out.mkdir(parents=True)
    for name in ("bound-1", "bound-2"):
        hold = tmp_path / f"hold-{name}"  # where the folder waits while the tmpfs goes on
        hold.mkdir()
        folder, hold, parent_ = (shlex.quote(str(p)) for p in (out, hold, parent))
        cluster.worker(
            name,
            f"mount --bind {folder} {hold} && mount -t tmpfs tmpfs {parent_} && "
            f"mkdir {folder} && mount --bind {hold} {folder} && umount {hold}",
        )
    cluster.addresses(2)
    psfmask = observation_dir / "psfmask.fits"
    shared = run_cli(
        "run",
        asn,
        "-o",
        out,
        "--psfmask",
        psfmask,
        "--scheduler-file",
        cluster.scheduler_file,
        "--wait-for-workers",
        2,
    )
    assert shared.returncode == 0, shared.stderr
    seen = f"output folder {out} and its 7 input files seen by all 2 workers"  # asn, 5, PSFMASK
    assert seen in shared.stderr
    local = run_cli(
        "run",
        asn,
        "-o",
        tmp_path / "local",
        "--psfmask",
        psfmask,
        "--n-workers",
        2,
        "--memory-limit",
        "1GiB",
    )
    assert local.returncode == 0, local.stderr
    expected = fingerprints(tmp_path / "local")
    assert len(expected) == 13  # 5 crfints, psfstack, 2 psfalign, 2 psfsub, i2d, snr, ecsv
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # no token, no partial
    assert _but_primary(fingerprints(out)) == _but_primary(expected)
    for name in expected:
        if name.endswith(".fits"):
            assert _primary(out / name) == _primary(tmp_path / "local" / name), name


def _but_primary(found: dict) -> dict:
    """Products' fingerprints but their primary headers' (compared by ``_primary``)."""
    return {
        name: {k: v for k, v in parts.items() if k != "0:PRIMARY/header"}
        for name, parts in found.items()
    }


#: What differs between two runs of the same blocks: the date, and the worker peak the
#: plan predicts, which adds the memory measured on the workers as they idle (LocalCluster
#: workers and ``dask worker`` processes hold different modules).
VARIES = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+|worker peak [\d.]+ GiB")


def _primary(path: Path) -> list[str]:
    from astropy.io import fits

    cards = fits.getheader(path).cards
    return [VARIES.sub("<varies>", str(card)) for card in cards if card.keyword != "DATE"]


def test_what_a_worker_does_not_see_is_said(observation_dir, tmp_path, monkeypatch):
    """The worker's side of the check, in this process: each way of seeing another folder
    than the client's is named (no cluster needed to see another working folder, a folder
    missing, a token file differing, an input file missing)."""
    from coron_dask.runtime.workers import shared_view

    out = tmp_path / "products"
    out.mkdir()
    (out / ".token").write_text("abc")
    members = tuple(str(p) for p in sorted(observation_dir.glob("*_calints.fits")))
    assert len(members) == 5
    host = socket.gethostname()
    assert shared_view(str(out), str(out), ".token", "abc", members) == (host, None)
    assert os.listdir(out) == [".token"]  # its own file written and removed
    monkeypatch.chdir(tmp_path)
    assert shared_view(str(out), "products", ".token", "abc", members) == (host, None)
    monkeypatch.chdir(out)
    assert shared_view(str(out), "products", ".token", "abc", ())[1] == (
        f"products is {out / 'products'} from its working folder {out}"
    )
    missing = tmp_path / "elsewhere"
    assert shared_view(str(missing), str(missing), ".token", "abc", ())[1] == (
        "no such folder (the client's token file is not there)"
    )
    assert shared_view(str(out), str(out), ".other", "abc", ())[1] == (
        "another folder of that name (the client's token file is not there)"
    )
    assert shared_view(str(out), str(out), ".token", "abd", ())[1] == (
        "another folder of that name (the client's token file differs)"
    )
    gone = str(tmp_path / "gone_calints.fits")
    assert shared_view(str(out), str(out), ".token", "abc", (*members, gone))[1] == (
        f"cannot read the input file {gone} (No such file or directory)"
    )
