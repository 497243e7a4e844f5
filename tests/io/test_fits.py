"""Lazy calints reading: labelled, chunked, header in attrs, nothing read until computed."""

import pickle

import numpy as np
import pytest
from astropy.io import fits

from coron_dask.core.errors import CoronInputError
from coron_dask.io import open_exposure, read_psfmask
from tests.conftest import count_computes


def calints(observation_dir):
    return sorted(observation_dir.glob("*_calints.fits"))[0]


def test_open_exposure_is_lazy_labelled_and_exact(observation_dir):
    path = calints(observation_dir)
    with count_computes() as counter:
        dataset = open_exposure(path, {"integration": 1})
    assert counter.count == 0
    assert dataset["sci"].dims == ("integration", "y", "x")
    assert dataset["sci"].data.chunks[0] == (1,) * dataset.sizes["integration"]
    assert dataset.attrs["INSTRUME"] == "NIRCAM"
    assert dataset["sci"].attrs["BUNIT"] == "MJy/sr"
    assert list(dataset["integration"].values) == list(range(1, dataset.sizes["integration"] + 1))
    with fits.open(path) as hdul:
        for name in ("SCI", "ERR", "DQ"):
            values = dataset[name.lower()].values
            np.testing.assert_array_equal(values, hdul[name].data)
            assert values.dtype == hdul[name].data.dtype.newbyteorder("=")


def test_graph_pickles_without_file_handles(observation_dir):
    dataset = open_exposure(calints(observation_dir))
    graph = dict(dataset["sci"].data.__dask_graph__())
    restored = pickle.loads(pickle.dumps(graph))
    assert len(restored) == len(graph)


def test_psfmask_shape_is_checked(observation_dir):
    mask = read_psfmask(observation_dir / "psfmask.fits", (64, 64))
    assert mask.dtype == np.float64 and mask.min() == 0 and mask.max() == 1
    with pytest.raises(CoronInputError, match="PSFMASK has shape"):
        read_psfmask(observation_dir / "psfmask.fits", (64, 80))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "file not found"),
        ("garbage", "not a readable FITS file"),
        ("no_err", "missing extension"),
        ("two_d", "expected 3"),
        ("err_shape", "ERR has shape"),
    ],
)
def test_bad_calints_are_named(tmp_path, damage, message):
    path = tmp_path / f"{damage}_calints.fits"
    cube = np.zeros((2, 8, 8), np.float32)
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(cube, name="SCI"),
        fits.ImageHDU(cube, name="ERR"),
        fits.ImageHDU(cube.astype(np.uint32), name="DQ"),
    ]
    if damage == "garbage":
        path.write_bytes(b"this is not FITS" * 100)
    elif damage != "missing":
        if damage == "no_err":
            del hdus[2]
        elif damage == "two_d":
            hdus[1] = fits.ImageHDU(cube[0], name="SCI")
        elif damage == "err_shape":
            hdus[2] = fits.ImageHDU(cube[:, :4], name="ERR")
        fits.HDUList(hdus).writeto(path)
    with pytest.raises(CoronInputError, match=message) as error:
        open_exposure(path)
    assert error.value.source == str(path)


def test_extension_read_in_the_files_byte_order(observation_dir):
    """The reader the fit, the shift and KLIP read back blocks with gives the values of
    the file in its own (big-endian) order; unsigned integers (DQ) stay native (BZERO is
    applied)."""
    from coron_dask.io.fitsfile import FitsExtension

    path = calints(observation_dir)
    with fits.open(path) as hdul:
        for name in ("SCI", "DQ"):
            hdu = hdul[name]
            data = hdu.data
            offset = hdu.fileinfo()["datLoc"]
            dtype = data.dtype.newbyteorder("=")
            native = FitsExtension(path, offset, data.shape, dtype)[1:3, :, 5:9]
            raw = FitsExtension(path, offset, data.shape, dtype, native=False)[1:3, :, 5:9]
            np.testing.assert_array_equal(raw, data[1:3, :, 5:9])
            np.testing.assert_array_equal(native, data[1:3, :, 5:9])
            assert native.dtype.isnative
            assert raw.dtype.isnative == (dtype.kind != "f")
