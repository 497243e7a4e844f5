"""Taking up a stopped write at the level of ``io``: any product, any extension, block by
block (FITS images, unsigned DQ, tables; blocks written by the tasks that make them), on
dask's synchronous scheduler."""

import signal

import dask
import dask.array as da
import numpy as np
import pytest
from astropy.io import fits

from coron_dask.core.errors import Interrupted
from coron_dask.io import Column, Extension, Product, table, write_products
from coron_dask.io.resume import STATE, clean
from coron_dask.io.staging import staged_products, write_blocks


def made(counter: list, name: str):
    """A function for map_blocks that counts, per array ``name``, the blocks it makes."""

    def make(block: np.ndarray) -> np.ndarray:
        if block.shape[-2:] == (5, 6):  # a block of frames, not dask probing the type
            counter.append(name)
        return block

    return make


def products(folder, counter: list) -> tuple[list[Product], dict]:
    """A 4-D product whose SCI is written by the tasks that make it (``write_blocks``), a
    3-D product of float32 and unsigned DQ with a table, and the data they hold."""
    rng = np.random.default_rng(3)
    quad = rng.normal(size=(4, 3, 5, 6)).astype(np.float32)
    cube = rng.normal(size=(6, 5, 6)).astype(np.float32)
    dq = rng.integers(0, 2**32, size=(6, 5, 6), dtype=np.uint32)
    sci = da.from_array(quad, chunks=(1, 3, -1, -1)).map_blocks(made(counter, "quad"))
    aligned = Product(
        folder / "x_psfalign.fits",
        {"DATAMODL": "QuadModel"},
        [
            Extension("SCI", sci),
        ],
    )
    on_disk = write_blocks("SCI", aligned, summary=lambda b: b.mean(axis=(-2, -1)))
    # the cube's blocks depend on the written quad (as KLIP's on psfalign)
    after = on_disk.written.sum().astype(np.float32)
    data = da.from_array(cube, chunks=(2, -1, -1)).map_blocks(made(counter, "cube"))
    data = data + 0 * after
    rows = table("ROWS", [Column("N", np.arange(6, dtype=np.int32))])
    sub = Product(
        folder / "x_psfsub.fits",
        {"DATAMODL": "CubeModel"},
        [
            Extension("SCI", data),
            Extension("DQ", da.from_array(dq, chunks=(3, -1, -1))),
            rows,
        ],
    )
    return [aligned, sub], {"quad": quad, "cube": cube, "dq": dq}


def test_a_stopped_write_is_taken_up_block_by_block(tmp_path):
    source = tmp_path / "input.fits"
    source.write_bytes(b"an input")
    counter: list = []
    first, truth = products(tmp_path, counter)
    with (
        pytest.raises(Interrupted) as stopped,
        dask.config.set(scheduler="synchronous"),
        staged_products(first, inputs=[source]) as writes,
    ):
        dask.compute(writes[0])  # the cube's SCI (and the quad it depends on), not the DQ
        raise Interrupted(signal.SIGTERM)
    # of 4 quad, 3 cube SCI, 2 DQ blocks and a table: the quad and the cube SCI
    assert "kept 7 of 10 blocks written" in stopped.value.kept
    assert not (tmp_path / "x_psfsub.fits").exists()
    assert counter.count("quad") == 4 and counter.count("cube") == 3
    counter.clear()
    again, _ = products(tmp_path, counter)
    with dask.config.set(scheduler="synchronous"):
        write_products(again, inputs=[source])
    assert counter == []  # nothing made again: the DQ and the table are only written
    with (
        fits.open(tmp_path / "x_psfsub.fits") as hdul,
        fits.open(tmp_path / "x_psfalign.fits") as q,
    ):
        np.testing.assert_array_equal(q["SCI"].data, truth["quad"])
        np.testing.assert_array_equal(hdul["SCI"].data, truth["cube"])
        np.testing.assert_array_equal(hdul["DQ"].data, truth["dq"])
        np.testing.assert_array_equal(hdul["ROWS"].data["N"], np.arange(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "input.fits",
        "x_psfalign.fits",
        "x_psfsub.fits",
    ]


def test_without_inputs_a_stop_keeps_nothing(tmp_path):
    """A write that cannot be taken up (no inputs named: ``write_products`` from Python)
    ends as any failure: nothing left."""
    counter: list = []
    first, _ = products(tmp_path, counter)
    with (
        pytest.raises(Interrupted) as stopped,
        dask.config.set(scheduler="synchronous"),
        staged_products(first) as writes,
    ):
        dask.compute(writes[0])
        raise Interrupted(signal.SIGTERM)
    assert stopped.value.kept is None
    assert list(tmp_path.iterdir()) == []
    assert not (tmp_path / STATE).exists()


def test_clean_removes_what_only_a_kill_leaves(tmp_path):
    # a partial, an earlier product set aside while placing, a shared-folder check's token:
    # SIGKILL at the wrong moment leaves each; a product is never touched
    left = [".a_i2d.fits.partial", ".a_i2d.fits.earlier", ".coron-dask-shared-0123abcd"]
    for name in left:
        (tmp_path / name).write_bytes(b"x" * 4096)
    (tmp_path / "a_psfsub.fits").write_bytes(b"product")
    line = clean(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_psfsub.fits"]
    assert line.startswith(f"{tmp_path}: removed 3 ")
    assert clean(tmp_path) == f"{tmp_path}: nothing to clean"
