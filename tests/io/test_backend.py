"""Products open lazily as xarray Datasets with named dimensions (coron_dask.open_product,
xr.open_dataset(engine="coron_dask")), holding what astropy reads from the files."""

import numpy as np
import pytest
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS

from coron_dask import run_coron3
from coron_dask.io import open_product
from coron_dask.io.fitsfile import FitsExtension

DIMS = {
    "crfints": ("integration", "y", "x"),
    "psfstack": ("psf", "y", "x"),
    "psfalign": ("integration", "psf", "y", "x"),
    "psfsub": ("kl", "integration", "y", "x"),
    "i2d": ("kl", "y", "x"),
    "snr": ("kl", "y", "x"),
}


@pytest.fixture(scope="module")
def run(asn, observation_dir, tmp_path_factory):
    """A KL-mode cube run of the small observation: its FITS products and a Zarr one."""
    folder = tmp_path_factory.mktemp("backend")
    options = dict(psfmask=observation_dir / "psfmask.fits", truncate=(2, 4))
    options.update(scheduler="synchronous", progress=False)
    paths = run_coron3(asn, folder / "fits", **options)
    zarr = run_coron3(asn, folder / "zarr", format="zarr", **options)
    return [p for p in paths if p.suffix == ".fits"], [p for p in zarr if p.suffix == ".zarr"]


def test_every_product_holds_what_astropy_reads(run):
    paths, _ = run
    assert {p.stem.rsplit("_", 1)[1] for p in paths} == set(DIMS)
    for path in paths:
        kind = path.stem.rsplit("_", 1)[1]
        dataset = xr.open_dataset(path, engine="coron_dask")
        with fits.open(path) as hdul:
            images = [h for h in hdul[1:] if isinstance(h, fits.ImageHDU)]
            assert sorted(dataset.data_vars) == sorted(
                [h.name for h in images] + (["shift"] if "ALIGN" in hdul else [])
            )
            for hdu in images:
                np.testing.assert_array_equal(dataset[hdu.name].values, hdu.data)
            sci = dataset[images[0].name]
            assert sci.dims == DIMS[kind], path.name
            if "kl" in sci.dims:
                assert list(dataset["kl"].values) == [2, 4]
            wcs = WCS(images[0].header, naxis=2)
            ra, dec = wcs.pixel_to_world_values(7, 3)
            assert np.isclose(dataset["ra"].values[3, 7], ra)
            assert np.isclose(dataset["dec"].values[3, 7], dec)
            assert dataset.attrs["INSTRUME"] == hdul[0].header["INSTRUME"]
            if "ALIGN" in hdul:
                table = hdul["ALIGN"].data
                shift = dataset["shift"].sel(param="dx").values.ravel()
                np.testing.assert_array_equal(shift, table["DX"])
                assert dataset["shift"].dims == ("integration", "psf", "param")


def test_nothing_is_read_until_asked_and_then_only_the_slab(run, monkeypatch):
    paths, _ = run
    psfalign = next(p for p in paths if p.name.endswith("_psfalign.fits"))
    reads = []
    original = FitsExtension.__getitem__

    def counting(self, key):
        out = original(self, key)
        reads.append(out.nbytes)
        return out

    monkeypatch.setattr(FitsExtension, "__getitem__", counting)
    dataset = open_product(psfalign)
    repr(dataset)
    assert reads == [] and dataset["SCI"].chunks is not None
    frame = dataset["SCI"].isel(integration=1, psf=2).values
    assert sum(reads) == frame.nbytes == 4 * dataset.sizes["y"] * dataset.sizes["x"]
    np.testing.assert_array_equal(frame, fits.getdata(psfalign, "SCI")[1, 2])
    reads.clear()
    lazy = xr.open_dataset(psfalign, engine="coron_dask")  # no dask: xarray's lazy indexing
    part = lazy["SCI"][0, 1:3, 5:9, ::2].values
    assert part.shape == (2, 4, dataset.sizes["x"] // 2) and len(reads) == 1
    np.testing.assert_array_equal(part, fits.getdata(psfalign, "SCI")[0, 1:3, 5:9, ::2])


def test_zarr_products_open_with_the_same_dims(run):
    paths, stores = run
    for store in stores:
        kind = store.stem.rsplit("_", 1)[1]
        dataset = open_product(store)
        twin = open_product(next(p for p in paths if p.stem == store.stem))
        name = "SNR" if kind == "snr" else "SCI"
        assert dataset[name].dims == twin[name].dims == DIMS[kind]
        np.testing.assert_array_equal(dataset[name].values, twin[name].values)
