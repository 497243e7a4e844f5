"""What a run interrupted by a signal, a lost node or SIGKILL keeps for the next run of the
same command: a hidden folder in the output folder (``.coron-dask-resume``) that holds the
run's fingerprint (its inputs, parameters and products' layout: ``fingerprint``), a lock
(one run writes into a folder at a time) and, per extension, a record of every block
written so far with its checksum (``BlockJournal``), next to the products' partial files.

A rerun with the same fingerprint keeps the partial files and reuses each block whose
record is there and whose checksum the file still matches (``io.reuse``); any other run
into the folder removes them first. ``clean`` removes them on request
(``coron-dask clean DIR``).
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from coron_dask.core.errors import CoronInputError

log = logging.getLogger(__name__)

#: The hidden folder of a run's state, in its output folder.
STATE = ".coron-dask-resume"
#: The run's date, which differs between two runs of the same command, in keywords' text.
WHEN = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+")


def partial_path(path: Path) -> Path:
    """The hidden file (or store) product ``path`` is written in until it is whole: one
    name for every run into the folder (the lock keeps them apart), so a rerun finds it."""
    return path.with_name(f".{path.name}.partial")


def checksum(block: np.ndarray) -> int:
    """The CRC-32 of ``block``'s values (native byte order, C order): what its record keeps,
    and what the block read back from the file must give."""
    block = np.ascontiguousarray(block)
    if not block.dtype.isnative:
        block = block.astype(block.dtype.newbyteorder("="))
    return zlib.crc32(memoryview(block).cast("B"))


def block_name(where: tuple[slice, ...]) -> str:
    """A block's record's file name: its place in the extension, start-stop on each axis."""
    return "_".join(f"{s.start}-{s.stop}" for s in where)


class BlockJournal:
    """The records of the blocks of one extension written so far, one small file per block
    (written whole: a temporary file renamed), so tasks on any worker of any node can add
    theirs at once. Picklable: a write task gets it with its target."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockJournal) and self.folder == other.folder

    def record(self, where: tuple[slice, ...], crc: int, summary: np.ndarray | None) -> None:
        """Record that the block at ``where`` is on disk with checksum ``crc`` (and what its
        write task gave back, ``summary``: handed on again when the block is reused)."""
        entry = {"crc": crc}
        if summary is not None:
            entry.update(shape=list(summary.shape), summary=summary.ravel().tolist())
        name = os.path.join(self.folder, block_name(where))
        temporary = f"{name}.{writer()}.{threading.get_ident()}"
        with open(temporary, "w") as handle:
            json.dump(entry, handle)
        os.replace(temporary, name)

    @classmethod
    def of(cls, path: Path, extension: str) -> "BlockJournal":
        """The journal of extension ``extension`` of product ``path``."""
        return cls(path.parent / STATE / "blocks" / path.name / extension)

    def active(self) -> bool:
        """Whether the run keeps records (one that can be taken up: ``ResumeState.begin``)."""
        return os.path.isdir(self.folder)

    def records(self) -> dict[str, dict]:
        """Every block recorded, by its name (``block_name``)."""
        found = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                if "." in entry.name:  # a record being written
                    continue
                with contextlib.suppress(OSError, ValueError):
                    found[entry.name] = json.loads(Path(entry.path).read_text())
        return found


def _undated(value: object) -> object:
    """``value`` with the run's date masked (keywords' text quotes it)."""
    if isinstance(value, str):
        return WHEN.sub("<date>", value)
    if isinstance(value, tuple | list):
        return [_undated(item) for item in value]
    return value


def _keywords(keywords: dict) -> list:
    """Keywords but the date and the free text (HISTORY: the date, and the block plan's
    predicted peak, which follows the memory measured on the workers)."""
    return sorted(
        (key, repr(_undated(value)))
        for key, value in keywords.items()
        if key not in ("DATE", "HISTORY", "COMMENT")
    )


def file_stamp(path: Path) -> tuple[str, int, int]:
    """What says whether an input file changed: its path, size and modification time."""
    info = Path(path).stat()
    return str(Path(path).absolute()), info.st_size, info.st_mtime_ns


def fingerprint(products: Iterable, inputs: Iterable[Path] = ()) -> str:
    """The fingerprint of a run: its ``inputs`` (paths, sizes, modification times), the
    code that runs (coron_dask's files, likewise), and its products as they will be
    written but for the date: names, keywords (the parameters, the block plan, the member
    exposures and PSFMASK are recorded there), extensions' shapes, types and blocks."""
    digest = hashlib.sha256()
    code = Path(__file__).parents[1]
    for path in sorted([*code.rglob("*.py"), *code.rglob("*.yaml")]):
        digest.update(repr(file_stamp(path)).encode())
    for path in inputs:
        digest.update(repr(file_stamp(path)).encode())
    for product in products:
        digest.update(repr((product.path.name, product.scratch)).encode())
        digest.update(repr(_keywords(product.primary)).encode())
        for extension in product.extensions:
            data = extension.data
            chunks = getattr(data, "chunks", None)
            made_of = (extension.name, _keywords(extension.keywords), extension.dims)
            digest.update(repr((*made_of, data.shape, str(data.dtype), chunks)).encode())
    return digest.hexdigest()


class ResumeState:
    """The state of the runs into ``folder``: locked by the run that holds it (``lock``);
    started afresh or taken up (``begin``); kept, removed or cleared at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / STATE
        self._lock: object | None = None

    # -- the lock: one run writes into a folder at a time --------------------------------

    def lock(self) -> None:
        """Hold the folder's lock (the system lets it go when the process ends, however it
        ends), or raise CoronInputError naming the run that holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / "lock", "a+")  # held until release
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise CoronInputError(
                    self.folder,
                    f"another coron-dask run ({holder}) is writing here: wait for it to "
                    "end, or give another output folder",
                ) from None
            log.warning("%s cannot be locked (%s): run one run at a time here", self.folder, error)
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()}, process {os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- the state ----------------------------------------------------------------------

    def recorded(self) -> dict:
        """The state an earlier run left (empty: none)."""
        try:
            return json.loads((self.path / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    def begin(self, fingerprint: str | None, partials: list[Path]) -> bool:
        """Take up the state an earlier run of the same ``fingerprint`` left (True), or
        remove whatever was left and start afresh (False). ``fingerprint`` None: a run that
        keeps nothing for a rerun."""
        earlier = self.recorded()
        left = [Path(item) for item in earlier.get("partials", [])]
        left += [item for item in partials if item.exists()]
        resumed = fingerprint is not None and earlier.get("fingerprint") == fingerprint
        if not resumed and (earlier or any(item.exists() for item in left)):
            removed = self.remove_partials(left)
            log.warning(
                "removed what an earlier run with other inputs, parameters or code left "
                "(%d file(s), %.3g GB)",
                len(removed),
                sum(size for _, size in removed) / 1e9,
            )
        if not resumed:
            shutil.rmtree(self.path / "blocks", ignore_errors=True)
            shutil.rmtree(self.path / "layouts", ignore_errors=True)
        state = {"fingerprint": fingerprint, "partials": [str(item) for item in partials]}
        (self.path / "state.json").write_text(json.dumps(state, indent=1))
        return resumed

    def layout(self, product_path: Path, layout: list[int] | None = None) -> list | None:
        """The layout the partial file of ``product_path`` was reserved with (where each
        extension's data start, and its size; None: not known); ``layout``: record it."""
        record = self.path / "layouts" / f"{product_path.name}.json"
        if layout is not None:
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps(layout))
            return layout
        try:
            return json.loads(record.read_text())
        except (OSError, ValueError):
            return None

    def journal(self, product_path: Path, extension: str, *, fresh: bool = False) -> BlockJournal:
        """The journal of an extension, its folder made (``fresh``: emptied first)."""
        journal = BlockJournal.of(product_path, extension)
        if fresh:
            shutil.rmtree(journal.folder, ignore_errors=True)
        os.makedirs(journal.folder, exist_ok=True)
        return journal

    def blocks(self) -> int:
        """How many blocks are recorded."""
        folder = self.path / "blocks"
        return sum(
            len(BlockJournal(extension).records())
            for product in (folder.iterdir() if folder.is_dir() else ())
            for extension in product.iterdir()
        )

    @staticmethod
    def remove_partials(partials: Iterable[Path]) -> list[tuple[Path, int]]:
        """Remove ``partials`` (files or Zarr stores): each removed, with its size on disk."""
        removed = []
        for partial in partials:
            if partial.is_dir():
                size = sum(item.stat().st_blocks * 512 for item in partial.rglob("*"))
                shutil.rmtree(partial, ignore_errors=True)
            elif partial.exists():
                size = partial.stat().st_blocks * 512
                partial.unlink(missing_ok=True)
            else:
                continue
            removed.append((partial, size))
        return removed

    def remove(self) -> None:
        """Remove the state (the lock last: it is let go as the run ends)."""
        for item in self.path.iterdir() if self.path.is_dir() else ():
            if item.name != "lock":
                shutil.rmtree(item) if item.is_dir() else item.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.path / "lock").unlink()
            self.path.rmdir()
        self.release()


def kept_line(state: ResumeState, partials: list[Path], total: int) -> str | None:
    """What a run stopped by a signal kept, and how to resume or remove it (the end of its
    last line); None when nothing was written to keep."""
    written = state.blocks()
    if not written:
        return None
    size = sum(p.stat().st_blocks * 512 for p in partials if p.is_file())
    size += sum(f.stat().st_blocks * 512 for p in partials if p.is_dir() for f in p.rglob("*"))
    return (
        f"kept {written} of {total} blocks written ({size / 1e9:.3g} GB) in {state.folder}: "
        f"run the same command again to resume, or `coron-dask clean {state.folder}` "
        "to remove them"
    )


#: The start of the name of the token a run's shared-filesystem check writes in the output
#: folder (``runtime.connection``), followed by its writer: ``HOST.PID.RANDOM``.
SHARED_TOKEN = ".coron-dask-shared-"
#: Hidden files of a run that only a SIGKILL leaves: partials, products of an earlier run set
#: aside while placing (``staging``), the shared-filesystem check's token.
LEFT_BY_A_KILL = (".*.partial", ".*.earlier", f"{SHARED_TOKEN}*")


def writer() -> str:
    """This process, as the names of the files it writes say: ``HOST.PID``."""
    return f"{socket.gethostname()}.{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clear_stale_partials(path: Path) -> None:
    """Remove what a killed run of an earlier version left of product ``path`` (partial
    files named after their host and process): those of this host whose process is gone.
    Those of other hosts may belong to a run still going there: they are reported, not
    touched."""
    host = socket.gethostname()
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        writer = stale.name.removeprefix(f".{path.name}.").removesuffix(".partial")
        where, _, pid = writer.rpartition(".")
        if where == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            ResumeState.remove_partials([stale])
            log.warning("removed %s, left by an earlier run that was killed", stale)
        elif where != host:
            log.warning("%s is being written, or was left, by a run on %s", stale, where or "?")


def clear_stale_tokens(folder: Path) -> None:
    """Remove the shared-filesystem check's tokens in ``folder`` that are not this
    process's: left by a run that was killed (called with the folder locked, so no other
    run is checking its workers there)."""
    for token in Path(folder).glob(f"{SHARED_TOKEN}*"):
        if not token.name.startswith(f"{SHARED_TOKEN}{writer()}."):
            token.unlink(missing_ok=True)
            log.info("removed %s, left by an earlier run that was killed", token)


def clean(folder: Path) -> str:
    """Remove what interrupted runs left in ``folder`` (its resume state and partial
    files; an earlier product set aside while products were placed, a shared-filesystem
    check's token: what a SIGKILL at that moment leaves); say what was removed. Refused
    while a run writes there."""
    state = ResumeState(folder)
    left = [path for pattern in LEFT_BY_A_KILL for path in Path(folder).glob(pattern)]
    if not state.path.is_dir() and not left:
        return f"{folder}: nothing to clean"
    state.lock()
    try:
        partials = [Path(item) for item in state.recorded().get("partials", [])]
        partials += left
        blocks = state.blocks()
        removed = state.remove_partials(dict.fromkeys(partials))
    finally:
        state.remove()
    size = sum(size for _, size in removed) / 1e9
    return (
        f"{folder}: removed {len(removed)} partial file(s) ({size:.3g} GB) and the records "
        f"of {blocks} block(s)"
    )
