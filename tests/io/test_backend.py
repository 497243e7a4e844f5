"""Products open lazily as xarray Datasets with named dimensions (coron_dask.open_product,
xr.open_dataset(engine="coron_dask")), holding what astropy reads from the files."""

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from astropy.io import fits
from astropy.wcs import WCS

from coron_dask import run_coron3
from coron_dask.core.errors import CoronInputError
from coron_dask.io import open_product
from coron_dask.io.backend import whole_frames
from coron_dask.io.fitsfile import FitsExtension
from tests.conftest import run_main

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
                [h.name for h in images] + (["converged", "shift"] if "ALIGN" in hdul else [])
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
                converged = dataset["converged"].values.ravel()
                np.testing.assert_array_equal(converged, table["CONVERGED"] == 1)
                assert dataset["converged"].dims == ("integration", "psf")


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


#: Primary keywords that differ between two runs: when and under which name each was
#: written, and HISTORY (its block plan line gives the run's predicted worker peak).
PER_RUN = {"DATE", "FILENAME", "HISTORY"}


def test_fits_and_zarr_open_to_the_same_dataset(run):
    """Every product, written both ways by the pipeline, opens to the same variables,
    dimensions, coordinates (ra/dec, integration, psf, kl, shift), attributes and values,
    by open_product and by the engine."""
    paths, stores = run
    assert len(stores) == len(paths)
    for store in stores:
        twin = next(p for p in paths if p.stem == store.stem)
        engine = [xr.open_dataset(p, engine="coron_dask") for p in (twin, store)]
        for fits_ds, zarr_ds in (engine, (open_product(twin), open_product(store))):
            assert set(fits_ds.variables) == set(zarr_ds.variables), store.name
            assert {"ra", "dec"} <= set(zarr_ds.coords), store.name
            for name, variable in fits_ds.variables.items():
                assert zarr_ds[name].dims == variable.dims, (store.name, name)
                assert zarr_ds[name].attrs == variable.attrs, (store.name, name)
                np.testing.assert_array_equal(zarr_ds[name].values, variable.values)
            kept = set(fits_ds.attrs) - PER_RUN
            assert {k: zarr_ds.attrs[k] for k in kept} == {k: fits_ds.attrs[k] for k in kept}
            assert len(zarr_ds.attrs["HISTORY"]) == len(fits_ds.attrs["HISTORY"])
            assert engine[1]["SCI" if "SCI" in engine[1] else "SNR"].chunks is None  # no dask
    psfalign = next(p for p in stores if p.name.endswith("_psfalign.zarr"))
    dropped = xr.open_dataset(psfalign, engine="coron_dask", drop_variables=["ra", "ERR", "shift"])
    assert {"dec", "SCI"} <= set(dropped.variables)
    assert not {"ra", "ERR", "shift"} & set(dropped.variables)


def test_preferred_chunks_are_whole_frames_of_the_chunk_size(run):
    """As many whole frames as dask's array.chunk-size holds, the innermost axis first and
    whole chunks of a store; a 22,000-frame psfalign opens as tens of chunks, not 44,000."""
    paths, stores = run
    fits_path = next(p for p in paths if p.name.endswith("_psfalign.fits"))
    store = next(p for p in stores if p.name.endswith("_psfalign.zarr"))
    frame = 64 * 64 * 4
    for limit, expected in [(frame, (1, 1)), (4 * frame, (1, 4)), (13 * frame, (2, 6))]:
        with dask.config.set({"array.chunk-size": f"{limit}B"}):
            sci = open_product(fits_path)["SCI"]
            assert sci.data.chunksize == (*expected, 64, 64)
            stored = zarr.open_array(str(store), path="SCI", mode="r").chunks
            chunks = open_product(store)["SCI"].data.chunksize
            assert chunks[-2:] == (64, 64) and chunks[0] % stored[0] == 0, (chunks, stored)
    assert whole_frames((4400, 5, 320, 320), 4, (1, 1, 320, 320)) == (65, 5, 320, 320)
    blocks = -(-4400 // 65)
    assert blocks == 68 and 65 * 5 * 320 * 320 * 4 <= dask.utils.parse_bytes("128MiB")


def _bad(tmp_path):
    """Paths that are not products, each with what the error says."""
    cases = {}
    cases[tmp_path / "missing_psfsub.fits"] = "not found"
    (tmp_path / "notes.fits").write_text("SIMPLE")
    cases[tmp_path / "notes.fits"] = "not a coron-dask product"
    (tmp_path / "empty_psfsub.zarr").mkdir()
    cases[tmp_path / "empty_psfsub.zarr"] = "not a Zarr store"
    (tmp_path / "folder_i2d.fits").mkdir()
    cases[tmp_path / "folder_i2d.fits"] = "not a Zarr store"
    (tmp_path / "text_i2d.fits").write_text("not a FITS file at all\n" * 200)
    cases[tmp_path / "text_i2d.fits"] = "not a FITS file"
    return cases


def test_what_is_not_a_product_is_one_clear_error(run, tmp_path):
    paths, _ = run
    cases = _bad(tmp_path)
    psfsub = next(p for p in paths if p.name.endswith("_psfsub.fits"))
    truncated = tmp_path / "cut_psfsub.fits"
    truncated.write_bytes(psfsub.read_bytes()[: psfsub.stat().st_size // 2])
    cases[truncated] = "truncated"
    for path, problem in cases.items():
        for opener in (open_product, lambda p: xr.open_dataset(p, engine="coron_dask")):
            with pytest.raises(CoronInputError) as caught:
                opener(path)
            assert str(caught.value).startswith(str(path)) and problem in str(caught.value)


def test_plot_of_a_folder_that_is_not_a_store_is_one_line(tmp_path, capsys):
    (tmp_path / "run_psfsub.zarr").mkdir()
    code, out, err = run_main(["plot", tmp_path], capsys)
    assert out == ""
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().count("\n") == 0 and err.count(str(tmp_path / "run_psfsub.zarr")) == 1
    assert "not a Zarr store" in err
