"""Lazy calints reading: labelled, chunked, header in attrs, nothing read until computed."""

import pickle

import numpy as np
import pytest
from astropy.io import fits

from coron_dask.core.errors import CoronInputError
from coron_dask.io import open_exposure, read_psfmask
from coron_dask.io.fits import read_headers, read_table
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
        ("folder", "is a folder, not a FITS file"),
        ("cut_short", "truncated FITS file"),
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
    elif damage == "folder":
        path.mkdir()
    elif damage != "missing":
        if damage == "no_err":
            del hdus[2]
        elif damage == "two_d":
            hdus[1] = fits.ImageHDU(cube[0], name="SCI")
        elif damage == "err_shape":
            hdus[2] = fits.ImageHDU(cube[:, :4], name="ERR")
        fits.HDUList(hdus).writeto(path)
        if damage == "cut_short":  # inside DQ's data
            with fits.open(path) as hdul:
                start = hdul["DQ"].fileinfo()["datLoc"]
            with open(path, "r+b") as handle:
                handle.truncate(start + 100)
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


def test_headers_read_alone_place_the_data_where_astropy_does(tmp_path, observation_dir):
    """read_headers (headers only, seeking past the data) against astropy's data offsets
    and sizes, on a calints and on a file of every kind of HDU: images of several types,
    a table with a heap (variable-length arrays: PCOUNT), a tile-compressed image, an
    extension without a name; its table rows as astropy reads them."""
    rng = np.random.default_rng(1)
    rows = fits.BinTableHDU.from_columns(
        [
            fits.Column("PSF", "J", array=np.arange(5)),
            fits.Column("DX", "D", array=rng.normal(size=5)),
            fits.Column("NAME", "7A", array=[f"ref{i}" for i in range(5)]),
        ],
        name="ALIGN",
    )
    heap = fits.BinTableHDU.from_columns(
        [fits.Column("V", "PJ()", array=np.array([np.arange(n) for n in (3, 70, 9)], object))]
    )
    mixed = tmp_path / "mixed.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(rng.normal(size=(3, 5, 7)).astype(">f4"), name="SCI"),
            heap,
            fits.CompImageHDU(rng.integers(0, 9, (40, 30)).astype("i2"), name="ZIMG"),
            rows,
            fits.ImageHDU(np.arange(12, dtype=np.uint16).reshape(3, 4), name="DQ"),
            fits.ImageHDU(),
        ]
    ).writeto(mixed)
    for path in (mixed, calints(observation_dir)):
        with fits.open(path) as hdul:
            expected = [(h.name, h.fileinfo()["datLoc"]) for h in hdul]
            spans = [h.fileinfo()["datSpan"] for h in hdul]
        hdus = read_headers(path)
        assert [(h.name, h.offset) for h in hdus] == expected
        assert [-(-h.nbytes // 2880) * 2880 for h in hdus] == spans
    align = next(h for h in read_headers(mixed) if h.name == "ALIGN")
    table = read_table(mixed, align)
    for name in ("PSF", "DX"):
        np.testing.assert_array_equal(table[name], rows.data[name])
    assert list(np.char.decode(table["NAME"], "ascii")) == list(rows.data["NAME"])


def test_an_input_cut_short_after_its_check_is_bad_input(observation_dir, tmp_path):
    """A read by a task of a file changed since it was opened (cut short, removed) is bad
    input naming the file, not an OSError the command line would take for products not
    written; the error pickles as made, as it crosses from a worker to the client."""
    path = tmp_path / "cut_calints.fits"
    path.write_bytes(calints(observation_dir).read_bytes())
    dataset = open_exposure(path, {"integration": 1})
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(CoronInputError) as error:
        dataset["dq"].compute()
    assert error.value.source == str(path.resolve())
    assert error.value.problem.startswith("cannot be read: file ends inside its")
    copy = pickle.loads(pickle.dumps(error.value))
    assert (type(copy), copy.source, copy.problem) == (
        CoronInputError,
        error.value.source,
        error.value.problem,
    )
    path.unlink()
    with pytest.raises(CoronInputError, match="cannot be read: No such file"):
        dataset["sci"].compute()
