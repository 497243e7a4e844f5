"""A private single-node SLURM cluster on this machine, for the tests that submit dask workers
as SLURM jobs: its own slurm.conf (read through SLURM_CONF), munge key and munge socket, state,
spool and logs, all in one temporary folder, on free ports. It never reads or writes
/etc/slurm or /etc/munge, so it runs beside a SLURM the machine may already have, and stopping
it ends every process it started (jobs included) and removes its folder.

``python -m tests.slurm_sandbox --cycles 2`` starts and stops it twice, with a job running
each time, and prints what it started as JSON (tests/test_slurm.py checks nothing survives).
Needs root (slurmd runs jobs as their users) and Debian's slurmctld, slurmd, slurm-client and
munge packages (.ci/slurm-up installs them when missing)."""

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "coron-dask-ci"  # not the host's name: a SLURM already on this host keeps its node
#: what the machine's own SLURM and munge keep; the sandbox must leave them as they were
SYSTEM_PATHS = (Path("/etc/slurm"), Path("/etc/munge"))


def installed() -> bool:
    commands = (*DAEMONS, "sbatch", "squeue", "scancel", "sinfo")
    return all(shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") for name in commands)


def install() -> None:
    """Debian's packages, when missing (.ci/slurm-up, root only)."""
    if not installed():
        subprocess.run(["bash", str(ROOT / ".ci" / "slurm-up")], check=True, timeout=600)


def system_state() -> dict[str, object]:
    """What the machine's own SLURM and munge set-up is made of: every file and folder under
    SYSTEM_PATHS (absent ones too) with its owner, mode and, for files, a hash of its bytes."""
    state: dict[str, object] = {}
    for top in SYSTEM_PATHS:
        if not top.exists():
            state[str(top)] = None
            continue
        for path in [top, *sorted(top.rglob("*"))]:
            info = path.lstat()
            entry = [info.st_uid, info.st_gid, info.st_mode]
            if path.is_file() and not path.is_symlink():
                entry.append(hashlib.sha256(path.read_bytes()).hexdigest())
            state[str(path)] = entry
    return state


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, on every interface (slurmctld and slurmd bind them all)."""
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def processes_of(conf: Path) -> list[psutil.Process]:
    """Every process of the cluster configured by ``conf``: its daemons, and what they and its
    jobs started (slurmstepd, job scripts, dask workers), known by the SLURM_CONF they
    inherited; not this process, nor its parents."""
    mine = f"SLURM_CONF={conf}".encode()
    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter():
        if process.pid in ours:
            continue
        try:
            if mine in Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0"):
                found.append(process)
        except OSError:  # gone, a zombie or a kernel thread
            continue
    return found


class PrivateSlurm:
    """``with PrivateSlurm() as slurm:`` a SLURM cluster of one node, ``NODE``, on loopback;
    ``slurm.env`` is the environment its commands (sbatch, squeue, ...) need."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.conf = self.socket = Path()
        self.daemons: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}

    # -- starting

    def start(self) -> "PrivateSlurm":
        # in /tmp, not pytest's deep folders: munge's socket path must stay short
        self.folder = Path(tempfile.mkdtemp(prefix="coron-dask-slurm-"))
        self.conf = self.folder / "slurm.conf"
        self.socket = self.folder / "munge" / "munge.socket"
        try:
            self._start()
        except Exception as error:
            logs = self.logs()
            self.stop()
            raise RuntimeError(
                f"the private SLURM cluster did not start: {error}\n{logs}"
            ) from None
        except BaseException:  # interrupted: nothing may be left running
            self.stop()
            raise
        return self

    def _start(self) -> None:
        folder = self.folder
        # munge's clients (slurm, as any user) must reach its socket: o+x on the way there
        folder.chmod(0o711)
        for name, mode in (("munge", 0o711), ("state", 0o700), ("spool", 0o700), ("log", 0o700)):
            (folder / name).mkdir(mode=mode)
        key = folder / "munge" / "munge.key"
        # a key of our own, readable by its owner only (munged refuses anything laxer)
        with os.fdopen(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._launch(
            "munged",
            "--foreground",
            f"--key-file={key}",
            f"--socket={self.socket}",
            f"--pid-file={folder / 'munge' / 'munged.pid'}",
            f"--seed-file={folder / 'munge' / 'munged.seed'}",
            f"--log-file={folder / 'log' / 'munged.log'}",
        )
        _wait(lambda: self._alive() and self.socket.exists(), 30, "munged made no socket")
        self.conf.write_text(self._configuration())
        self._launch("slurmctld", "-D", "-f", str(self.conf))
        self._launch("slurmd", "-D", "-f", str(self.conf), "-N", NODE)
        _wait(self._node_up, 60, "the node did not come up")

    def _configuration(self) -> str:
        folder = self.folder
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        memory = psutil.virtual_memory().total // 2**20 - 1024
        controller_port, node_port = _free_ports(2)
        return f"""\
ClusterName=coron-dask-ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldPidFile={folder / "state" / "slurmctld.pid"}
SlurmdPidFile={folder / "spool" / "slurmd.pid"}
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldLogFile={folder / "log" / "slurmctld.log"}
SlurmdLogFile={folder / "log" / "slurmd.log"}
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _launch(self, name: str, *args: str) -> None:
        """A daemon in the foreground, our child, in a session of its own (no terminal
        signal reaches it), its output in the log folder."""
        with open(self.folder / "log" / f"{name}.out", "w") as out:
            self.daemons[name] = subprocess.Popen(
                [f"/usr/sbin/{name}", *args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _alive(self) -> bool:
        for name, daemon in self.daemons.items():
            if daemon.poll() is not None:
                raise RuntimeError(f"{name} exited with {daemon.returncode}")
        return True

    def _node_up(self) -> bool:
        return self._alive() and any(
            state in self.run("sinfo", "-h", "-o", "%T") for state in ("idle", "mix")
        )

    # -- using

    def run(self, *command: str, timeout: float = 30) -> str:
        """A SLURM command on this cluster: its output, "" if it failed."""
        answer = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        return answer.stdout if answer.returncode == 0 else ""

    def processes(self) -> list[psutil.Process]:
        return processes_of(self.conf) if self.folder is not None else []

    def logs(self) -> str:
        if self.folder is None or not (self.folder / "log").is_dir():
            return ""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted((self.folder / "log").iterdir())
        )

    # -- stopping

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons (SIGTERM, then SIGKILL), end whatever else of
        ours is left (a job step slurmd no longer watches) and remove the folder."""
        if self.folder is None:
            return
        if self.daemons.get("slurmctld") and self.daemons["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i").split()
            if jobs:
                self.run("scancel", *jobs)
                try:
                    _wait(lambda: not self.run("squeue", "-h", "-o", "%i").strip(), 30, "")
                except TimeoutError:
                    pass  # ended below
        for name in reversed(DAEMONS):
            daemon = self.daemons.get(name)
            if daemon is not None and daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait()
        left = self.processes()
        for process in left:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self.daemons = None, {}

    def __enter__(self) -> "PrivateSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _names(processes: list[psutil.Process]) -> dict[int, str]:
    names = {}
    for process in processes:
        try:
            names[process.pid] = process.name()
        except psutil.NoSuchProcess:
            continue
    return names


def _cycle() -> dict[str, object]:
    """One start and stop, with a job running when it stops: what it started."""
    with PrivateSlurm() as slurm:
        folder = slurm.folder
        job = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 600").strip()
        assert job, slurm.logs()
        _wait(lambda: "RUNNING" in slurm.run("squeue", "-h", "-o", "%T", "-j", job), 60, "job")
        # the job's sleep: in the job, it is the last thing to start
        _wait(lambda: "sleep" in _names(slurm.processes()).values(), 30, "job step")
        started = _names(slurm.processes())
        conf = (folder / "slurm.conf").read_text()
    return {"folder": str(folder), "job": job, "processes": started, "conf": conf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1)
    cycles = parser.parse_args().cycles
    print(json.dumps([_cycle() for _ in range(cycles)]))


if __name__ == "__main__":
    main()
