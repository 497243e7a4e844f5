"""Block-by-block FITS writing: exact bytes for any chunking, readable by stdatamodels,
and no product at all when a block fails; text products (ECSV) placed with the others."""

import ctypes
import resource
import signal

import dask
import dask.array as da
import numpy as np
import pytest
from astropy.io import fits
from stdatamodels.jwst import datamodels

from coron_dask.core.errors import CoronInputError
from coron_dask.io import Extension, Product, write_products
from coron_dask.io.fits_layout import preallocate
from coron_dask.io.staging import staged_products, write_blocks
from coron_dask.io.text_file import text_extension


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


def frame_means(block: np.ndarray) -> np.ndarray:
    """The frame means write_blocks gives back here (an independent numpy mean)."""
    return block.mean(axis=(-2, -1), dtype=np.float64)


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


def test_a_text_product_is_written_and_placed_with_the_others(tmp_path):
    """A text product (ECSV): its one lazy text, made from the same blocks as an image
    product, written byte for byte; placed with it, and neither when the text fails."""
    image = da.arange(12, chunks=4, dtype=np.float32).reshape(1, 3, 4)

    def text(values, fail=False):
        if fail:
            raise RuntimeError("no table")
        return np.array([f"# %ECSV 1.0\nsum\n{values.sum():.1f}\n"], dtype=object)

    for fail in (True, False):
        table = da.map_blocks(
            text, image.rechunk(-1), fail=fail, drop_axis=(1, 2), chunks=((1,),), dtype=object
        )
        products = [
            Product(tmp_path / "a_i2d.fits", {}, [Extension("SCI", image)]),
            Product(tmp_path / "a_candidates.ecsv", {}, [text_extension("ECSV", table)]),
        ]
        if fail:
            with pytest.raises(RuntimeError, match="no table"):
                write_products(products)
            assert list(tmp_path.iterdir()) == []
            continue
        assert write_products(products) == [p.path for p in products]
        assert (tmp_path / "a_candidates.ecsv").read_bytes() == b"# %ECSV 1.0\nsum\n66.0\n"
        np.testing.assert_array_equal(fits.getdata(tmp_path / "a_i2d.fits"), image.compute())
    with pytest.raises(ValueError, match="one text"):
        text_extension("ECSV", da.zeros(2, dtype=object, chunks=1))


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


def _read_back(written, source):
    """Each block written, read back inside the task that uses it: its sum over references."""
    return da.map_blocks(
        lambda means, indices: source[int(indices[0]) : int(indices[-1]) + 1].sum(axis=1),
        written[:, 0],
        da.arange(written.shape[0], chunks=written.chunks[:1]),
        new_axis=(1, 2),
        chunks=(written.chunks[0], (source.shape[2],), (source.shape[3],)),
        dtype=np.float32,
    )


@pytest.mark.parametrize("suffix", [".fits", ".zarr"])
def test_written_blocks_are_read_back_exactly(tmp_path, suffix):
    """write_blocks: every block written (into a FITS file and, alongside, a Zarr store),
    its frame means given back, read back exactly from the FITS file by a later product's
    tasks; the extension has no store task of its own, and the scratch file is gone."""
    cube = np.random.default_rng(1).normal(size=(5, 6, 4, 7)).astype(np.float32)
    scratch = _quad(tmp_path / "x_aligned.fits", cube)
    scratch.scratch = True
    zarr = [_quad(tmp_path / "x_psfalign.zarr", cube)] if suffix == ".zarr" else []
    products = [scratch, *zarr]
    stored = write_blocks("SCI", *products, summary=frame_means)
    later = Product(
        tmp_path / "x_psfsub.fits",
        {},
        [Extension("SCI", _read_back(stored.written, stored.source))],
    )
    means = Product(tmp_path / "x_means.fits", {}, [Extension("SCI", stored.written)])
    with staged_products([*products, later, means]) as writes:
        # the ERRs, the later product and the means: SCI is written by `stored.written`
        assert len(writes) == 2 + len(products)
        dask.compute(*writes, scheduler="threads")
    np.testing.assert_allclose(_read(later.path, "SCI"), cube.sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(_read(means.path, "SCI"), cube.mean(axis=(2, 3), dtype=np.float64))
    if suffix == ".zarr":
        np.testing.assert_array_equal(_read(products[1].path, "SCI"), cube)
    assert not list(tmp_path.glob("*aligned*")) and not list(tmp_path.glob(".*"))


def test_written_blocks_read_by_nothing_are_refused(tmp_path):
    """Its blocks would never be written: refused before anything is computed."""
    product = _quad(tmp_path / "x_psfalign.fits", np.ones((5, 6, 4, 7), np.float32))
    write_blocks("SCI", product, summary=frame_means)
    with pytest.raises(ValueError, match="no product reads"):
        with staged_products([product]):
            pass
    assert list(tmp_path.iterdir()) == []


def test_written_blocks_then_changed_header_is_refused(tmp_path):
    """Keywords added after write_blocks move the data: refused, not written astray."""
    product = _quad(tmp_path / "x_psfalign.fits", np.ones((5, 6, 4, 7), np.float32))
    stored = write_blocks("SCI", product, summary=frame_means)
    product.primary.update({f"KEY{i}": i for i in range(40)})  # one more header block
    later = Product(tmp_path / "x_psfsub.fits", {}, [Extension("SCI", stored.written)])
    with pytest.raises(ValueError, match="layout changed"):
        with staged_products([product, later]):
            pass
    assert list(tmp_path.iterdir()) == []


def test_uneven_blocks_cannot_be_written_to_zarr_by_their_tasks(tmp_path):
    """A Zarr chunk per block: blocks of uneven sizes would share chunks."""
    cube = np.ones((5, 6, 4, 7), np.float32)
    scratch = _quad(tmp_path / "x_aligned.fits", cube, chunks=((1, 4), 6, 4, 7))
    product = _quad(tmp_path / "x_psfalign.zarr", cube, chunks=((1, 4), 6, 4, 7))
    with pytest.raises(ValueError, match="uneven"):
        write_blocks("SCI", scratch, product, summary=frame_means)


def test_products_larger_than_the_free_disk_are_refused_before_anything_is_written(tmp_path):
    """One line naming the folder, the bytes needed and free; no file left behind."""
    huge = da.zeros((10**6, 10**6), dtype=np.float32, chunks=(10**4, 10**4))  # 4 TB
    scratch = Product(tmp_path / "x_aligned.fits", {}, [Extension("SCI", huge)], scratch=True)
    with pytest.raises(CoronInputError, match=r"need 4000\.0 GB, the disk has [\d.]+ GB free"):
        with staged_products([scratch]):
            pass
    assert list(tmp_path.iterdir()) == []


def _partials(folder):
    return [path for path in folder.iterdir() if path.name.endswith(".partial")]


@pytest.fixture
def allocating(tmp_path):
    """Skip where the filesystem of ``tmp_path`` does not allocate ahead (Linux fallocate,
    called here without coron-dask)."""
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        pytest.skip("no fallocate here")
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    with open(tmp_path / "probe", "wb") as handle:
        if fallocate(handle.fileno(), 0, 0, 2**16) != 0:
            pytest.skip("this filesystem does not allocate ahead (fallocate)")
    (tmp_path / "probe").unlink()


def test_products_own_their_disk_blocks_before_any_is_written(tmp_path, allocating):
    """The tasks write into allocated blocks (faster than into a sparse file's holes), and a
    disk or quota too small fails before anything is computed."""
    cube = np.zeros((4, 6, 32, 32), np.float32)
    with staged_products([_quad(tmp_path / "x_psfalign.fits", cube)]):
        (partial,) = _partials(tmp_path)
        assert partial.stat().st_size >= 2 * cube.nbytes
        assert partial.stat().st_blocks * 512 >= partial.stat().st_size


def test_a_product_the_disk_cannot_hold_is_refused_naming_it(tmp_path, allocating):
    """The file size limit stands in for a full disk or quota (the kernel refuses the
    allocation alike), without filling the disk."""
    path = tmp_path / "x_psfalign.fits"
    probe = tmp_path / "probe"
    with open(probe, "wb") as handle:
        preallocate(handle, 2880, path)
        assert probe.stat().st_blocks > 0
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        ignored = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, limits[1]))
        try:
            with pytest.raises(OSError, match="could not be reserved") as caught:
                preallocate(handle, 2**21, path)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, ignored)
    assert caught.value.filename == str(path)
    assert probe.stat().st_blocks == 0  # let go
