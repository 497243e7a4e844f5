"""coron-dask's products as lazy xarray Datasets with named dimensions.

``open_product(path)`` (or ``xr.open_dataset(path, engine="coron_dask")``) opens a FITS
product written by coron-dask (or jwst: the same layout) or a Zarr store of one: every
image extension a variable on ``integration``, ``psf``, ``kl``, ``set``, ``y``, ``x`` as the
product's kind and the extension's rank say; ``integration``, ``psf``, ``kl`` (the KLMODEn
cutoffs) and ``set`` coordinates; ``ra``, ``dec`` (degrees, on y, x) from the SCI header's
celestial WCS; the alignment record (ALIGN) as ``shift`` (…, psf, param); the primary
header as the Dataset's attributes and each extension's as its variable's. Nothing is read
until asked: each read takes only the requested slab from the file.
"""

from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.wcs import WCS
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from coron_dask.core.errors import CoronInputError
from coron_dask.io.fits import STRUCTURAL, _data_offset, _image_dtype
from coron_dask.io.fitsfile import FitsExtension

#: Product kinds by file-name suffix, and the dimensions before (y, x) of their images,
#: from the most to the fewest (the extension's rank picks; "kl" leads a KL-mode cube).
KINDS = {
    "calints": [("integration",)],
    "crfints": [("integration",)],
    "psfstack": [("psf",)],
    "psfalign": [("integration", "psf"), ("psf",)],
    "psfsub": [("kl", "integration"), ("integration",)],
    "i2d": [("kl",), ()],
    "snr": [("kl",), ()],
    "injections": [("set", "kl"), ("set",), ("kl",), ()],
}
PARAMS = ["dx", "dy", "beta"]


def product_kind(path: str | Path) -> str | None:
    """The kind of product ``path`` names (its suffix: psfsub, i2d, …), or None."""
    stem = Path(path).name.removesuffix(Path(path).suffix)
    kind = stem.rsplit("_", 1)[-1]
    return kind if kind in KINDS else None


def _dims(kind: str, name: str, ndim: int) -> tuple[str, ...]:
    """The dimensions of extension ``name`` of rank ``ndim`` in a product of ``kind``."""
    choices = KINDS[kind]
    if kind == "injections" and name == "SCI":
        choices = [("kl",), ()]
    if kind == "injections" and name == "MODEL":
        choices = [("set",)]
    for leading in choices:
        if len(leading) + 2 == ndim:
            return (*leading, "y", "x")
    raise CoronInputError(name, f"a {kind} extension of rank {ndim} is not one coron-dask writes")


class _FitsArray(BackendArray):
    """One image extension, read a slab at a time (``FitsExtension``)."""

    def __init__(self, source: FitsExtension) -> None:
        self.source = source
        self.shape = source.shape
        self.dtype = source.dtype

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    def _read(self, key: tuple) -> np.ndarray:
        """Integers and slices: the contiguous slab that holds them, then taken from it."""
        covering, taken = [], []
        for k, n in zip(key, self.shape, strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0 or start >= stop:
                    covering.append(slice(0, 0))
                    taken.append(slice(None))
                    continue
                covering.append(slice(start, stop))
                taken.append(slice(None, None, step))
            else:
                covering.append(slice(int(k), int(k) + 1))
                taken.append(0)
        return self.source[tuple(covering)][tuple(taken)]


def _keywords(header: fits.Header) -> dict:
    """A header as attributes: structural keywords out, HISTORY as a list."""
    out = {k: v for k, v in header.items() if k not in STRUCTURAL and not k.startswith("NAXIS")}
    if "HISTORY" in header:
        out["HISTORY"] = [str(entry) for entry in header["HISTORY"]]
    return out


def _sky(header: fits.Header, shape: tuple[int, int]) -> dict:
    """``ra``, ``dec`` (y, x) of a celestial WCS in ``header``; none without one."""
    try:
        wcs = WCS({k: v for k, v in header.items() if not k.startswith("NAXIS")}, naxis=2)
    except Exception:
        return {}
    if not wcs.has_celestial:
        return {}
    y, x = np.indices(shape, dtype=np.float64)
    ra, dec = wcs.pixel_to_world_values(x, y)
    attrs = {"units": "deg"}
    return {"ra": (("y", "x"), ra, attrs), "dec": (("y", "x"), dec, attrs)}


def _alignment(table: object, dims: dict, attrs: dict) -> xr.DataArray:
    """The ALIGN table (its columns by name) as ``shift`` (integration, psf, param) or
    (psf, param), with the table's keywords (ALIGN_TO) as attributes."""
    npsf = len(np.unique(table["PSF"]))
    values = np.stack([table["DX"], table["DY"], table["BETA"]], axis=-1).astype(np.float64)
    if dims.get("integration") and len(values) == npsf * dims["integration"]:
        values = values.reshape(dims["integration"], npsf, 3)
        return xr.DataArray(values, dims=("integration", "psf", "param"), attrs=attrs)
    return xr.DataArray(values.reshape(-1, npsf, 3)[0], dims=("psf", "param"), attrs=attrs)


def _open_fits(path: Path, drop_variables: set) -> xr.Dataset:
    kind = product_kind(path)
    variables: dict = {}
    sizes: dict = {}
    align = cutoffs = None
    align_keywords: dict = {}
    with fits.open(path, memmap=False) as hdul:
        attrs = _keywords(hdul[0].header)
        sky: dict = {}
        for hdu in hdul[1:]:
            if isinstance(hdu, fits.BinTableHDU):
                if hdu.name == "ALIGN":
                    align = np.array(hdu.data)
                    align_keywords = {"ALIGN_TO": hdu.header.get("ALIGN_TO", "")}
                continue
            if hdu.name in drop_variables or (hdu.data is None and hdu.header["NAXIS"] == 0):
                continue
            shape = tuple(hdu.shape)
            dims = _dims(kind, hdu.name, len(shape))
            source = FitsExtension(
                path.resolve(), _data_offset(str(path), hdu), shape, _image_dtype(hdu.header)
            )
            data = indexing.LazilyIndexedArray(_FitsArray(source))
            variable = xr.Variable(dims, data, _keywords(hdu.header))
            variable.encoding["preferred_chunks"] = {d: 1 for d in dims if d not in ("y", "x")}
            variables[hdu.name] = variable
            sizes.update(zip(dims, shape, strict=True))
            if not sky:  # the first image's WCS (SCI, or SNR of a detection map)
                sky = _sky(hdu.header, shape[-2:])
            if "kl" in dims and cutoffs is None:
                cutoffs = [hdu.header[f"KLMODE{i}"] for i in range(sizes["kl"])]
    coords: dict = dict(sky)
    if "integration" in sizes:
        coords["integration"] = np.arange(1, sizes["integration"] + 1)
    for name in ("psf", "set"):
        if name in sizes:
            coords[name] = np.arange(sizes[name])
    if "kl" in sizes:
        coords["kl"] = cutoffs
    dataset = xr.Dataset(variables, coords=coords, attrs=attrs)
    if align is not None and "shift" not in drop_variables:
        dataset["shift"] = _alignment(align, sizes, align_keywords)
        dataset = dataset.assign_coords(param=PARAMS)
    return dataset


class CoronDaskBackend(BackendEntrypoint):
    """xarray's engine "coron_dask": ``xr.open_dataset(path, engine="coron_dask")``."""

    description = "coron-dask and jwst coronagraphic products (FITS), lazily, dims named"
    url = "https://github.com/coron-dask"
    open_dataset_parameters = ("filename_or_obj", "drop_variables")

    def open_dataset(self, filename_or_obj, *, drop_variables=None) -> xr.Dataset:
        path = Path(filename_or_obj)
        if product_kind(path) is None:
            raise CoronInputError(path, "not a coron-dask product (its name ends in no kind)")
        return _open_fits(path, set(drop_variables or ()))

    def guess_can_open(self, filename_or_obj) -> bool:
        try:
            path = Path(filename_or_obj)
        except TypeError:
            return False
        return path.suffix == ".fits" and product_kind(path) is not None


def open_product(path: str | Path, chunks: dict | None = None) -> xr.Dataset:
    """A product (FITS, or a Zarr store) as a lazy Dataset with named dimensions, chunked
    a frame per block by default (``chunks``: xarray's)."""
    path = Path(path)
    if not path.exists():
        raise CoronInputError(path, "file not found")
    if path.suffix == ".zarr":
        dataset = xr.open_zarr(path, chunks=chunks if chunks is not None else {})
        if "SCI" in dataset and "kl" in dataset["SCI"].dims:
            cutoffs = [dataset["SCI"].attrs[f"KLMODE{i}"] for i in range(dataset.sizes["kl"])]
            dataset = dataset.assign_coords(kl=cutoffs)
        if (path / "ALIGN").is_dir():  # the alignment record: a group of one array per column
            table = xr.open_zarr(path, group="ALIGN", chunks=None)
            keywords = {"ALIGN_TO": table.attrs.get("ALIGN_TO", "")}
            dataset["shift"] = _alignment(table, dict(dataset.sizes), keywords)
            dataset = dataset.assign_coords(param=PARAMS)
        return dataset
    return xr.open_dataset(path, engine="coron_dask", chunks=chunks if chunks is not None else {})
