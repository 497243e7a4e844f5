"""Taking up a run that was stopped: the blocks it recorded (``resume.BlockJournal``) are
read back and checked against their checksums, and the graph of the products is changed
so that each block that passed is not made again. Its write task becomes the value the
task gave (a store's byte, or the summary ``write_blocks`` hands on), and the task that
made its data reads it back from the partial file, for any other step that uses it (the
i2d drizzles the psfsub blocks): the keys stay, so the tasks before (the alignment fit and
shift, KLIP, the outlier median) are dropped by dask's culling, wherever they are not
needed for a block still to write.
"""

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product as cartesian

import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.task_spec import DataNode, Task

from coron_dask.io.resume import BlockJournal, block_name, checksum
from coron_dask.io.zarr_store import ZarrTable

log = logging.getLogger(__name__)


@dataclass
class Writing:
    """One extension of one product being written: where its blocks go (``target``), the
    journal of those written, and the array of the tasks that make them: the data, which
    store tasks (``store``) write, or the tasks that write the blocks they make
    (``staging.write_blocks``; ``store`` None)."""

    product: str
    extension: str
    target: object
    journal: BlockJournal
    made: da.Array
    store: da.Array | None
    shape: tuple[int, ...]  # the extension's

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """The blocks written (``write_blocks``' are whole frames)."""
        if self.store is not None:
            return self.made.chunks
        frames = self.made.chunks[: len(self.shape) - 2]  # not a summary's values per frame
        return (*frames, (self.shape[-2],), (self.shape[-1],))

    def key(self, index: tuple) -> tuple:
        """The key of the summary ``made`` gives for the block of ``index``."""
        values = (0,) * (self.made.ndim - len(index) + 2)  # a summary's values per frame
        return (self.made.name, *index[:-2], *values)


def blocks(chunks: tuple[tuple[int, ...], ...]) -> Iterator[tuple[tuple, tuple[slice, ...]]]:
    """Each block of an array of ``chunks``: its index and its place."""
    starts = [np.cumsum((0, *sizes)) for sizes in chunks]
    for index in cartesian(*(range(len(sizes)) for sizes in chunks)):
        where = tuple(slice(int(s[i]), int(s[i + 1])) for s, i in zip(starts, index, strict=True))
        yield index, where


def _matches(target: object, where: tuple[slice, ...], crc: int) -> bool:
    try:
        return checksum(target[where]) == crc
    except (OSError, ValueError, KeyError):  # a file cut short, a store chunk missing
        return False


def verified(item: Writing, workers: int = 8) -> dict[tuple, dict]:
    """The blocks of ``item`` recorded and found on disk as they were written (read back,
    their checksum the record's): their records, by block index."""
    if isinstance(item.target, ZarrTable):  # a table is one small block: made again
        return {}
    records = item.journal.records()
    candidates = [
        (index, where, records[block_name(where)])
        for index, where in blocks(item.chunks)
        if block_name(where) in records
    ]
    with ThreadPoolExecutor(workers) as pool:  # reads and CRCs release the GIL
        good = list(pool.map(lambda c: _matches(item.target, c[1], c[2]["crc"]), candidates))
    found = {index: record for (index, _, record), ok in zip(candidates, good, strict=True) if ok}
    if len(found) < len(candidates):
        log.warning(
            "%s %s: %d recorded block(s) differ from the file: written again",
            item.product,
            item.extension,
            len(candidates) - len(found),
        )
    return found


def read_block(target: object, where: tuple[slice, ...]) -> np.ndarray:
    """A block written before, read back from its partial file (the task that made it, on
    a rerun)."""
    return target[where]


def written_nothing(block: np.ndarray) -> np.ndarray:
    return np.zeros((1,) * block.ndim, np.uint8)


def substitute(collections: list[da.Array], replaced: dict) -> list[da.Array]:
    """``collections`` computed as one graph in which each key of ``replaced`` is its node
    (a value, or a task that depends on nothing): the layers holding them are made
    explicit, the rest left as dask built them."""
    graph = HighLevelGraph.merge(*(item.__dask_graph__() for item in collections))
    layers = dict(graph.layers)
    by_layer: dict[str, dict] = {}
    for key, node in replaced.items():
        name = key[0] if key[0] in layers and key in layers[key[0]] else None
        name = name or next(n for n, layer in layers.items() if key in layer)
        by_layer.setdefault(name, {})[key] = node
    for name, nodes in by_layer.items():
        layers[name] = MaterializedLayer({**dict(layers[name]), **nodes})
    merged = HighLevelGraph(layers, graph.dependencies)
    return [da.Array(merged, item.name, item.chunks, dtype=item.dtype) for item in collections]


def value(key: tuple, array: np.ndarray) -> DataNode:
    return DataNode(key, array)


def read_task(key: tuple, target: object, where: tuple[slice, ...]) -> Task:
    return Task(key, read_block, target, where)


def kind_of(name: str) -> str:
    """``psfalign SCI`` for ``jw…_psfalign.fits SCI``."""
    product, extension = name.rsplit(" ", 1)
    stem = product.rsplit(".", 1)[0]
    return f"{stem.rsplit('_', 1)[-1]} {extension}"


def block_count(items: list[Writing]) -> int:
    """How many blocks ``items`` write."""
    return sum(int(np.prod([len(c) for c in item.chunks])) for item in items)


def reused(writes: list[da.Array], items: list[Writing]) -> list[da.Array]:
    """``writes`` with every block of ``items`` found written (``verified``) not made
    again; and, so that a block no product's store needs any more is still written (the
    psfalign blocks of a psfsub block reused, one of them found damaged), one task per
    block of each ``write_blocks`` array."""
    replaced: dict = {}
    counts: dict[str, list[int]] = {}
    groups: dict[str, list[Writing]] = {}
    for item in items:
        if item.store is None:
            groups.setdefault(item.made.name, []).append(item)
            continue
        found = verified(item)
        for index in found:
            replaced[(item.store.name, *index)] = value(
                (item.store.name, *index), np.zeros((1,) * len(index), np.uint8)
            )
            key = (item.made.name, *index)
            where = dict(blocks(item.chunks))[index]
            replaced.setdefault(key, read_task(key, item.target, where))
        counts[f"{item.product} {item.extension}"] = [len(found), block_count([item])]
    extras = []
    for name, group in groups.items():
        found = [verified(item) for item in group]
        common = set.intersection(*(set(f) for f in found))
        for index in common:
            record = found[0][index]
            summary = np.asarray(record["summary"], np.float64).reshape(record["shape"])
            key = group[0].key(index)
            replaced[key] = value(key, summary)
        for item in group:
            counts[f"{item.product} {item.extension}"] = [len(common), block_count([item])]
        made = group[0].made
        extras.append(
            made.map_blocks(
                written_nothing,
                dtype=np.uint8,
                chunks=tuple((1,) * len(c) for c in made.chunks),
                name=f"resume-check-{name}",
            )
        )
    kinds: dict[str, list[int]] = {}  # by kind of product and extension: psfalign SCI
    for name, (k, n) in counts.items():
        kind = kinds.setdefault(kind_of(name), [0, 0])
        kind[0], kind[1] = kind[0] + k, kind[1] + n
    kept, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    log.info(
        "resume: reusing %d of %d blocks written before (%s)",
        kept,
        total,
        ", ".join(f"{name} {k}/{n}" for name, (k, n) in kinds.items()),
    )
    return substitute([*writes, *extras], replaced) if replaced else writes
