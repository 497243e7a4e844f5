"""Block-by-block FITS writing: exact bytes for any chunking, readable by stdatamodels,
and no product at all when a block fails."""

import dask
import dask.array as da
import numpy as np
import pytest
from astropy.io import fits
from stdatamodels.jwst import datamodels

from coron_dask.io import Extension, Product, write_products
from coron_dask.io.products import staged_products


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
