"""Block-by-block FITS writing: exact bytes for any chunking, readable by stdatamodels,
and no product at all when a block fails."""

import dask
import dask.array as da
import numpy as np
import pytest
from astropy.io import fits
from stdatamodels.jwst import datamodels

from coron_dask.io import Extension, Product, write_products
from coron_dask.io.products import staged_products, write_through


@pytest.mark.parametrize("chunks", [(1, 1, -1, -1), (2, 3, -1, -1), (-1, 2, -1, -1), -1])
def test_quad_written_block_by_block_reads_back_exactly(tmp_path, chunks):
    rng = np.random.default_rng(0)
    cube = rng.normal(size=(3, 5, 7, 9)).astype(np.float32)
    path = tmp_path / "x_psfalign.fits"
    product = Product(
        path,
        {"INSTRUME": "NIRCAM", "DATAMODL": "QuadModel", "LONGSTR": "x" * 100},
        [
            Extension("SCI", da.from_array(cube, chunks=chunks), {"BUNIT": "MJy/sr"}),
            Extension("ERR", da.from_array(2 * cube, chunks=chunks)),
        ],
    )
    with dask.config.set(scheduler="threads"):
        write_products([product])
    with fits.open(path) as hdul:
        hdul.verify("exception")
        np.testing.assert_array_equal(hdul["SCI"].data, cube)
        np.testing.assert_array_equal(hdul["ERR"].data, 2 * cube)
        assert hdul["SCI"].header["BUNIT"] == "MJy/sr"
        assert hdul[0].header["LONGSTR"] == "x" * 100
    with datamodels.open(path) as model:
        assert isinstance(model, datamodels.QuadModel)
        np.testing.assert_array_equal(model.data, cube)


def test_unsigned_dq_round_trips(tmp_path):
    dq = np.array([[[0, 1, 2**31 + 5, 2**32 - 1]]], dtype=np.uint32)
    path = tmp_path / "x_psfsub.fits"
    sci = da.zeros(dq.shape, dtype=np.float32)
    write_products(
        [
            Product(
                path,
                {"DATAMODL": "CubeModel"},
                [Extension("SCI", sci), Extension("DQ", da.from_array(dq))],
            )
        ]
    )
    with datamodels.open(path) as model:
        assert isinstance(model, datamodels.CubeModel)
        np.testing.assert_array_equal(model.dq, dq)


def test_failure_leaves_no_product_and_no_temporary(tmp_path):
    def explode(block):
        if block.min() > 5:
            raise RuntimeError("worker lost")
        return block

    good = da.arange(4, chunks=2, dtype=np.float32).reshape(1, 1, 4)
    bad = da.arange(10, chunks=2, dtype=np.float32).map_blocks(explode).reshape(1, 2, 5)
    products = [
        Product(tmp_path / "a_psfstack.fits", {}, [Extension("SCI", good)]),
        Product(tmp_path / "b_psfsub.fits", {}, [Extension("SCI", bad)]),
    ]
    with pytest.raises(RuntimeError, match="worker lost"):
        write_products(products)
    assert list(tmp_path.iterdir()) == []


def test_products_appear_only_after_all_blocks(tmp_path):
    path = tmp_path / "a_psfstack.fits"
    product = Product(path, {}, [Extension("SCI", da.ones((2, 3, 3), chunks=1))])
    with staged_products([product]) as writes:
        assert not path.exists()
        dask.compute(*writes)
        assert not path.exists()
    assert path.exists()


def _quad(path, cube, chunks=(2, 3, -1, -1)):
    return Product(
        path,
        {"DATAMODL": "QuadModel"},
        [
            Extension("SCI", da.from_array(cube, chunks=chunks), dims=("i", "p", "y", "x")),
            Extension("ERR", da.from_array(2 * cube, chunks=chunks), dims=("i", "p", "y", "x")),
        ],
    )


def _read(path, name):
    if path.suffix == ".zarr":
        import zarr

        return zarr.open_group(str(path), mode="r")[name][...]
    with fits.open(path) as hdul:
        return hdul[name].data


@pytest.mark.parametrize("suffix", [".fits", ".zarr"])
def test_written_through_extension_is_written_as_a_later_product_reads_it(tmp_path, suffix):
    """write_through: the later product reads each block as it is written, both come out
    exact, and the extension has no store task of its own."""
    cube = np.random.default_rng(1).normal(size=(5, 6, 4, 7)).astype(np.float32)
    aligned = _quad(tmp_path / f"x_psfalign{suffix}", cube)
    through = write_through(aligned, "SCI")
    later = Product(tmp_path / f"x_psfsub{suffix}", {}, [Extension("SCI", through.sum(axis=1))])
    with staged_products([aligned, later]) as writes:
        (stores,) = writes
        assert len(stores) == 2  # ERR and the later product: SCI is written by `through`
        dask.compute(*writes, scheduler="threads")
    np.testing.assert_array_equal(_read(aligned.path, "SCI"), cube)
    np.testing.assert_array_equal(_read(aligned.path, "ERR"), 2 * cube)
    np.testing.assert_allclose(_read(later.path, "SCI"), cube.sum(axis=1), atol=1e-5)


def test_written_through_but_read_by_nothing_is_refused(tmp_path):
    """Its blocks would never be written: refused before anything is computed."""
    product = _quad(tmp_path / "x_psfalign.fits", np.ones((5, 6, 4, 7), np.float32))
    write_through(product, "SCI")
    with pytest.raises(ValueError, match="no product reads it"):
        with staged_products([product]):
            pass
    assert list(tmp_path.iterdir()) == []


def test_written_through_then_changed_header_is_refused(tmp_path):
    """Keywords added after write_through move the data: refused, not written astray."""
    product = _quad(tmp_path / "x_psfalign.fits", np.ones((5, 6, 4, 7), np.float32))
    through = write_through(product, "SCI")
    product.primary.update({f"KEY{i}": i for i in range(40)})  # one more header block
    later = Product(tmp_path / "x_psfsub.fits", {}, [Extension("SCI", through.sum(axis=1))])
    with pytest.raises(ValueError, match="layout changed"):
        with staged_products([product, later]):
            pass
    assert list(tmp_path.iterdir()) == []


def test_uneven_blocks_cannot_be_written_through_to_zarr(tmp_path):
    """A Zarr chunk per block: blocks of uneven sizes would share chunks."""
    cube = np.ones((5, 6, 4, 7), np.float32)
    product = _quad(tmp_path / "x_psfalign.zarr", cube, chunks=((1, 4), 6, 4, 7))
    with pytest.raises(ValueError, match="uneven"):
        write_through(product, "SCI")
