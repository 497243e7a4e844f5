"""Writing products block by block, whole or not at all.

Each product's headers are written first into a hidden temporary file whose data areas
are reserved (its blocks allocated on disk: ``fits_layout.preallocate``); dask tasks then
write their blocks straight into place (each into a picklable target that opens the file
itself, ``stored``). An extension a later step reads (psfalign's SCI, which KLIP reads)
is written by the tasks that make its blocks and read back by the tasks that use it
(``write_blocks``): handed on in memory, each block waited on a worker until dask got
round to its readers and its write. Only when every block of every product is written
are the temporary files renamed to their JWST names. One run writes into a folder at a
time (a lock); a run that can be taken up records each block written (``io.resume``):
stopped by a signal or a lost cluster it keeps them, and the same run again reuses those
found intact (``io.reuse``); on any other failure they are removed.
Scratch files (what a run keeps on disk rather than in workers' memory) are written the
same way and removed at the end. A product whose path ends in ``.zarr`` is written as a
Zarr store (``io.zarr_store``), a table extension as a FITS BINTABLE or a Zarr group, by
the same computation as the images, before the file is placed.
"""

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.layers import ArraySliceDep

from coron_dask.core.errors import (
    CoronInputError,
    Interrupted,
    raise_if_stopped,
    record_on_disk,
)
from coron_dask.core.names import layer_word
from coron_dask.io import reuse
from coron_dask.io.fits_layout import fits_layout, reserve_fits
from coron_dask.io.fitsfile import FitsExtension, FitsRegion
from coron_dask.io.products import OnDisk, Product, Written
from coron_dask.io.resume import (
    BlockJournal,
    ResumeState,
    checksum,
    clear_stale_partials,
    clear_stale_tokens,
    fingerprint,
    kept_line,
)
from coron_dask.io.resume import partial_path as _partial
from coron_dask.io.text_file import is_text, reserve_text
from coron_dask.io.zarr_store import ZarrArray, ZarrTable, reserve_zarr, zarr_chunks, zarr_target

log = logging.getLogger(__name__)


def target(product: Product, name: str) -> "FitsRegion | ZarrArray | ZarrTable":
    """Where extension ``name`` of ``product`` is written, known before the file exists (a
    target the write tasks write blocks into)."""
    partial = _partial(product.path)
    index = next(i for i, item in enumerate(product.extensions) if item.name == name)
    if product.path.suffix == ".zarr":
        return zarr_target(partial, product.extensions[index])
    layout, _ = fits_layout(product, partial)
    return layout[1 + index][1]


def reader(product: Product, name: str) -> FitsExtension:
    """What reads back any part of extension ``name`` of FITS ``product`` while it is being
    written (from its partial file), once the tasks that wrote that part have run. Its
    readers (the fit, the shift, KLIP) take what they read to float64: it is read in the
    file's byte order, swapped in that conversion rather than in a pass of its own."""
    region = target(product, name)
    if not isinstance(region, FitsRegion):
        raise ValueError(f"{product.path.name}: only a FITS file is read back")
    return FitsExtension(region.path, region.offset, region.shape, region.dtype, native=False)


def written_by(product: Product, name: str, array: da.Array) -> None:
    """Record that the tasks of ``array`` write extension ``name`` of ``product`` (into
    ``target``): it gets no store task, and the stores must depend on ``array``."""
    extension = next(item for item in product.extensions if item.name == name)
    extension.written = Written(array, target(product, name))


def _record(journals: tuple, where: tuple[slice, ...], block: np.ndarray, summary=None) -> None:
    """Record, once the block is on disk, that it was written (a run that keeps records)."""
    active = [journal for journal in journals if journal.active()]
    if active:
        crc = checksum(block)
        for journal in active:
            journal.record(where, crc, summary)


def write_block(
    block: np.ndarray,
    where: tuple[slice, ...],
    to: tuple,
    summary: Callable,
    journals: tuple[BlockJournal, ...] = (),
) -> np.ndarray:
    """Write ``block`` at ``where`` in each of ``to`` (and record it in ``journals``); give
    back ``summary`` of it (float64, one value per frame or a row of values per frame: what
    a later step reading the block back needs first, such as KLIP's frame means or zone
    means), as frames of one pixel (of one row of pixels)."""
    for item in to:
        item[where] = block
    summarized = summary(block)
    _record(journals, where, block, summarized)
    per_frame = summarized.ndim == block.ndim - 2
    return summarized[..., None, None] if per_frame else summarized[..., None, :]


def store_block(
    block: np.ndarray, where: tuple[slice, ...], to: object, journal: BlockJournal | None = None
) -> np.ndarray:
    """Write ``block`` at ``where`` in ``to`` (and record it in ``journal``); give back one
    byte (what is written is done with)."""
    to[where] = block
    _record(() if journal is None else (journal,), where, block)
    return np.zeros((1,) * block.ndim, np.uint8)


def stored(
    data: da.Array, product: Product, name: str, to: object, journal: BlockJournal | None = None
) -> da.Array:
    """The tasks that write each block of ``data`` (extension ``name`` of ``product``)
    into ``to``, named after the product (``write-psfsub-sci``, ``write-iTwod-sci``: what
    the dashboard shows, ``core.names``)."""
    return da.map_blocks(
        store_block,
        data,
        ArraySliceDep(data.chunks),
        to,
        journal,
        chunks=tuple((1,) * len(chunks) for chunks in data.chunks),
        dtype=np.uint8,
        meta=np.empty((0,) * data.ndim, np.uint8),
        name=f"write-{layer_word(product.kind)}-{name.lower()}-" + tokenize(data, to),
    )


def write_blocks(
    name: str, *products: Product, summary: Callable, values: int | None = None
) -> OnDisk:
    """Extension ``name`` (the same data in each of ``products``) written by tasks that
    keep nothing: each writes its block and gives back only ``summary`` of the block, one
    float64 per frame (its last two axes are frames), or with ``values`` that many per
    frame (along a last axis): what the step reading it back needs first (KLIP's frame
    means, ``kernels.klip.frame_means``, or zone means), computed while the block is in
    memory.

    Tasks that read blocks back (from the first FITS product) depend on these instead of
    the data, so no block waits in a worker's memory for them and none is sent between
    workers; dask fuses the write into the task that makes the block when nothing else
    reads the data.
    """
    data = da.asarray(next(e for e in products[0].extensions if e.name == name).data)
    to = tuple(target(item, name) for item in products)
    if any(len(chunks) > 1 for chunks in data.chunks[-2:]):
        raise ValueError(f"{products[0].path.name} {name}: blocks must hold whole frames")
    for item in products:  # each block in one Zarr chunk: of one size, the last no larger
        even = all(set(c[:-1]) <= {c[0]} and c[-1] <= c[0] for c in data.chunks)
        if item.path.suffix == ".zarr" and not even:
            raise ValueError(f"{item.path.name} {name}: blocks {data.chunks} are uneven")
    written = da.map_blocks(
        write_block,
        data,
        ArraySliceDep(data.chunks),  # each block's place in the file
        to,
        summary,
        tuple(BlockJournal.of(item.path, name) for item in products),
        chunks=(*data.chunks[:-2], (1,), (values or 1,)),
        dtype=np.float64,
        name=f"write-{layer_word(products[0].kind)}-{name.lower()}-" + tokenize(data, to, summary),
    )[(..., 0, 0) if values is None else (..., 0, slice(None))]
    for item in products:
        written_by(item, name, written)
    fits_file = next(item for item in products if item.path.suffix != ".zarr")
    return OnDisk(written, reader(fits_file, name))


def _check_passed(passed: list[tuple[Product, Written, object]], sources: list[da.Array]):
    """Raise ValueError unless the stores depend on every extension written by the tasks
    that make it (or its blocks would never be written), and it writes where its file was
    reserved."""
    layers = set()
    for source in sources:
        layers.update(source.__dask_graph__().layers)
    for product, written, target in passed:
        if written.array.name not in layers:
            raise ValueError(f"{product.path.name}: written by tasks no product reads")
        if written.target != target:
            raise ValueError(f"{product.path.name}: its layout changed after write_blocks")


def _remove(partial: Path) -> None:
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)


def _place_all(products: list[Product], partials: list[Path]) -> None:
    """Rename every product's partial to its name, all or none: a product of an earlier run
    under that name is set aside first (a directory cannot be replaced in one go) and
    removed once all are placed. If a rename fails, the products placed are removed again
    and those set aside put back; any that could not be removed are recorded on the error
    (``errors.record_on_disk``)."""
    placed: list[tuple[Path, Path | None]] = []
    try:
        for item, partial in zip(products, partials, strict=True):
            if item.scratch:
                continue
            earlier = None
            if item.path.exists() or item.path.is_symlink():
                earlier = item.path.with_name(partial.name.removesuffix(".partial") + ".earlier")
                os.replace(item.path, earlier)
            placed.append((item.path, earlier))
            os.replace(partial, item.path)
    except BaseException as error:
        left = []
        for final, earlier in reversed(placed):
            try:
                _remove(final)
                if earlier is not None:
                    os.replace(earlier, final)
            except OSError:
                log.error("could not take back %s after a failure to place the products", final)
                left.append(final)
        if left:
            record_on_disk(error, left)
        raise
    for _, earlier in placed:
        if earlier is not None:
            _remove(earlier)


def _check_space(products: list[Product]) -> None:
    """Raise CoronInputError, before anything is written, unless the folders of the FITS
    products and scratch files have room for all of them (a Zarr store's compressed size,
    and a text file's, are not known beforehand: not counted)."""
    needed: dict[Path, int] = {}
    for item in products:
        if item.path.suffix != ".zarr" and not is_text(item):
            folder = item.path.parent
            needed[folder] = needed.get(folder, 0) + fits_layout(item, item.path)[1]
    for folder, size in needed.items():
        free = shutil.disk_usage(folder).free
        if size > free:
            raise CoronInputError(
                folder,
                f"the products and scratch files need {size / 1e9:.1f} GB, "
                f"the disk has {free / 1e9:.1f} GB free",
            )


def _begin(products: list[Product], inputs: list[Path] | None, states: dict) -> bool:
    """Lock the products' folders into ``states`` (one run writes into a folder at a time)
    and take up what an earlier run of the same fingerprint left there (True), or clear
    what any other run left."""
    for item in products:
        item.path.parent.mkdir(parents=True, exist_ok=True)
        if item.path.parent not in states:
            state = ResumeState(item.path.parent)
            state.lock()
            states[item.path.parent] = state
            clear_stale_tokens(item.path.parent)
        clear_stale_partials(item.path)
    # a run is taken up only in one folder, with its inputs known
    kept = fingerprint(products, inputs) if inputs is not None and len(states) == 1 else None
    resumed = False
    for folder, state in states.items():
        partials = [_partial(item.path) for item in products if item.path.parent == folder]
        resumed = state.begin(kept, partials)
    return resumed


def _reserve(item: Product, state: ResumeState | None, resumed: bool) -> tuple[list, bool]:
    """The targets of ``item``'s extensions in its partial file, which a run taken up
    (``resumed``) keeps when it is still of the product's layout (True)."""
    partial = _partial(item.path)
    zarr = item.path.suffix == ".zarr"
    keep = resumed and partial.is_dir() if zarr else False
    if not zarr and not is_text(item) and state is not None:
        layout, size = fits_layout(item, partial)
        where = [region.offset for _, region in layout[1:]] + [size]
        keep = resumed and state.layout(item.path) == where and partial.is_file()
        keep = keep and partial.stat().st_size == size
        state.layout(item.path, where)
    if is_text(item):  # one small text, written whole: made again
        _remove(partial)
        return reserve_text(item, partial), False
    if not keep:
        _remove(partial)
    return (reserve_zarr if zarr else reserve_fits)(item, partial, keep=keep), keep


@contextlib.contextmanager
def staged_products(products: list[Product], inputs: list[Path] | None = None) -> Iterator[list]:
    """Yield the lazy writes of ``products``; on a clean exit rename them into place.

    The caller computes the yielded writes (all together, so shared inputs load once).
    Extensions written by the tasks that make them (``write_blocks``) get no store task:
    the other products' stores must depend on them, which is checked, as is the room on
    disk. Any exception removes every temporary file and leaves no product behind; those
    an earlier, killed run left are removed first. With ``inputs`` (the files the products
    are made from) the run can be taken up: each block written is recorded
    (``io.resume``), a signal (``errors.Interrupted``) or a lost cluster keeps what was
    written, and the same run again reuses it (``io.reuse``).
    """
    states: dict[Path, ResumeState] = {}
    written: list[reuse.Writing] = []
    try:
        resumed = _begin(products, inputs, states)
        keeping = any(state.recorded().get("fingerprint") for state in states.values())
        _check_space([item for item in products if not _partial(item.path).exists()])
        sources, writes, passed = [], [], []
        for item in products:
            state = states[item.path.parent] if keeping else None
            reserved, kept = _reserve(item, state, resumed)
            for extension, target in zip(item.extensions, reserved, strict=True):
                journal = None
                if state is not None and not is_text(item):  # a text is made again
                    journal = state.journal(item.path, extension.name, fresh=not kept)
                if extension.written is not None:  # by the tasks that make its blocks
                    passed.append((item, extension.written, target))
                    made, store = extension.written.array, None
                else:
                    made = da.asarray(extension.data)
                    made = made.rechunk(zarr_chunks(made)) if item.path.suffix == ".zarr" else made
                    sources.append(made)
                    store = stored(made, item, extension.name, target, journal)
                    writes.append(store)
                if journal is not None:
                    name = (item.path.name, extension.name)
                    shape = extension.data.shape
                    written.append(reuse.Writing(*name, target, journal, made, store, shape))
        # computed together: one graph, so a block several products need (the aligned
        # references: psfalign and psfsub) is computed once
        _check_passed(passed, sources)
        if resumed:
            writes = reuse.reused(writes, written)
        yield writes
        raise_if_stopped()  # a signal recorded while they were computed: none is placed
    except BaseException as error:
        kept = None
        resumable = isinstance(error, Interrupted) or getattr(error, "resumable", False)
        if resumable and written:
            (state,) = states.values()
            partials = [_partial(item.path) for item in products]
            kept = kept_line(state, partials, reuse.block_count(written))
        if kept is None:
            for item in products:
                if item.path.parent in states:  # not those of a run holding the lock
                    _remove(_partial(item.path))
            for state in states.values():
                state.remove()
        else:
            error.kept = kept
            for state in states.values():
                state.release()
        raise
    try:
        _place_all(products, [_partial(item.path) for item in products])
    finally:
        for item in products:  # scratch files, and any product not placed
            _remove(_partial(item.path))
        for state in states.values():
            state.remove()


def write_products(
    products: list[Product], compute=None, inputs: list[Path] | None = None
) -> list[Path]:
    """Write ``products`` with ``compute`` (default ``dask.compute``) and return their paths
    (scratch files are not products); with ``inputs``, a run that can be taken up
    (``staged_products``)."""
    with staged_products(products, inputs) as writes:
        (compute or dask.compute)(*writes)
    return [item.path for item in products if not item.scratch]
