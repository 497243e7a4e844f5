"""coron-dask's products as lazy xarray Datasets with named dimensions.

``open_product(path)`` (or ``xr.open_dataset(path, engine="coron_dask")``) opens a FITS
product written by coron-dask (or jwst: the same layout) or a Zarr store of one, to the same
Dataset: every image extension a variable on ``integration``, ``psf``, ``kl``, ``set``,
``y``, ``x`` as the product's kind and the extension's rank say; ``integration``, ``psf``,
``kl`` (the KLMODEn cutoffs) and ``set`` coordinates; ``ra``, ``dec`` (degrees, on y, x)
from the celestial WCS of SCI (SNR in a detection map), computed for the part asked for;
the alignment record (ALIGN) as ``shift`` (…, psf, param) and ``converged`` (…, psf;
where it has CONVERGED), and what each reference is as ``psf`` coordinates, named as
``steps.align_refs.align_models`` names them (``psf_exposure``, ``psf_integration``, and
with ADI ``psf_kind``, ``psf_roll``: where ALIGN has PSF_FILE, PSF_INT, KIND, ROLL); the
primary keywords as the Dataset's attributes and each extension's as its variable's.

Opening reads the headers (a Zarr store's metadata) and the small ALIGN table, nothing of
the images: each read takes only the requested slab from the file. The preferred chunks
(``chunks={}``, ``open_product``'s default) are whole frames, as many as fit dask's
``array.chunk-size``, whole chunks of a Zarr store.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import xarray as xr
from astropy.wcs import WCS
from dask.utils import parse_bytes
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from coron_dask.core.errors import CoronInputError
from coron_dask.io.fits import _image_dtype, check_plain, header_keywords, read_headers, read_table
from coron_dask.io.fitsfile import FitsExtension
from coron_dask.io.zarr_store import read_store

log = logging.getLogger(__name__)

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
#: Extensions of their own dimensions: psfsub's record of the references KLIP chose for each
#: (integration, zone), most correlated first (``steps.reference_choice``)
OWN_DIMS = {
    "REFS": ("integration", "zone", "rank"),
    "REFCORR": ("integration", "zone", "rank"),
}
PARAMS = ["dx", "dy", "beta"]
#: ALIGN's columns that say what each reference is, and their ``psf`` coordinates.
REFERENCE_COLUMNS = {
    "PSF_FILE": "psf_exposure",
    "PSF_INT": "psf_integration",
    "KIND": "psf_kind",
    "ROLL": "psf_roll",
}
#: The extension whose WCS gives ``ra``, ``dec`` and whose KLMODEn the ``kl`` coordinate,
#: in order of preference (a detection map has no SCI); else the first image.
PRINCIPAL = ("SCI", "SNR")


def product_kind(path: str | Path) -> str | None:
    """The kind of product ``path`` names (its suffix: psfsub, i2d, …), or None."""
    stem = Path(path).name.removesuffix(Path(path).suffix)
    kind = stem.rsplit("_", 1)[-1]
    return kind if kind in KINDS else None


def _dims(path: Path, kind: str, name: str, ndim: int) -> tuple[str, ...]:
    """The dimensions of extension ``name`` of rank ``ndim`` in the product ``path`` of
    ``kind``."""
    choices = KINDS[kind]
    if name in OWN_DIMS and len(OWN_DIMS[name]) == ndim:
        return OWN_DIMS[name]
    if kind == "injections" and name == "SCI":
        choices = [("kl",), ()]
    if kind == "injections" and name == "MODEL":
        choices = [("set",)]
    for leading in choices:
        if len(leading) + 2 == ndim:
            return (*leading, "y", "x")
    raise CoronInputError(path, f"{name} has {ndim} dimension(s), not one a {kind} has")


@dataclass
class Image:
    """One image extension as stored: a reader of any slab (``FitsExtension``,
    ``ZarrSource``: shape, dtype, indexing by a tuple of slices), its keywords and the
    storage's chunks (a FITS image: one frame)."""

    name: str
    source: object
    keywords: dict
    stored: tuple[int, ...]


@dataclass
class Contents:
    """What a product holds, whatever its format: primary keywords, images in order, and
    the ALIGN table's columns (PSF, DX, DY, BETA) and ALIGN_TO, if it has one."""

    primary: dict
    images: list[Image]
    align: dict | None = None
    align_to: str = ""


def whole_frames(shape: tuple[int, ...], itemsize: int, stored: tuple[int, ...]) -> tuple:
    """Chunks of whole frames (y, x whole) of about dask's ``array.chunk-size`` (at least one
    frame), each a run of the file (the innermost leading axis is filled first) and whole
    chunks of the storage (multiples of ``stored`` on the leading axes)."""
    target = parse_bytes(dask.config.get("array.chunk-size"))
    frame = int(np.prod(shape[-2:], dtype=np.int64)) * itemsize
    room = max(1, target // max(frame, 1))  # frames a chunk may hold
    chunks = list(shape)
    for axis in reversed(range(len(shape) - 2)):
        unit = max(1, min(stored[axis], shape[axis]))
        chunks[axis] = max(unit, min(shape[axis], room) // unit * unit)
        room = room // chunks[axis] if chunks[axis] == shape[axis] else 0
    return tuple(chunks)


class _Slabs(BackendArray):
    """An image read a slab at a time from its ``source``: xarray's basic indexing."""

    def __init__(self, source: object) -> None:
        self.source = source
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(source.dtype)

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


class _Sky(BackendArray):
    """``ra`` or ``dec`` (degrees) of the pixels of a (y, x) frame, computed from the WCS
    for the part asked for (a full frame of float64 twice over is not made at open)."""

    def __init__(self, wcs: WCS, shape: tuple[int, int], axis: int) -> None:
        self.wcs, self.shape, self.axis = wcs, tuple(shape), axis
        self.dtype = np.dtype(np.float64)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER, self._compute
        )

    def _compute(self, key: tuple) -> np.ndarray:
        y, x = (np.arange(n)[k] for k, n in zip(key, self.shape, strict=True))
        xx, yy = np.meshgrid(np.atleast_1d(x), np.atleast_1d(y))
        values = self.wcs.pixel_to_world_values(xx, yy)[self.axis]
        return values.reshape(np.shape(y) + np.shape(x))


def _sky(keywords: dict, shape: tuple[int, int]) -> dict:
    """``ra``, ``dec`` (y, x) of the celestial WCS in ``keywords``, lazily; none without one."""
    scalar = {k: v for k, v in keywords.items() if isinstance(v, bool | int | float | str)}
    try:
        wcs = WCS(scalar, naxis=2)
    except Exception:
        return {}
    if not wcs.has_celestial:
        return {}
    out = {}
    for axis, name in enumerate(("ra", "dec")):
        data = indexing.LazilyIndexedArray(_Sky(wcs, shape, axis))
        variable = xr.Variable(("y", "x"), data, {"units": "deg"})
        variable.encoding["preferred_chunks"] = dict(zip(("y", "x"), shape, strict=True))
        out[name] = variable
    return out


def _alignment(table: dict, dims: dict, attrs: dict) -> dict[str, xr.DataArray]:
    """The ALIGN table (its columns by name) as ``shift`` (integration, psf, param) or
    (psf, param), with the table's keywords (ALIGN_TO) as attributes, and where the table
    has CONVERGED, ``converged`` (integration, psf) or (psf,) bool."""
    npsf = len(np.unique(table["PSF"]))
    values = np.stack([table["DX"], table["DY"], table["BETA"]], axis=-1).astype(np.float64)
    columns = table.dtype.names if isinstance(table, np.ndarray) else list(table)
    if "CONVERGED" in columns:  # products before it have none
        values = np.concatenate([values, np.asarray(table["CONVERGED"])[:, None]], axis=-1)
    if dims.get("integration") and len(values) == npsf * dims["integration"]:
        values, leading = values.reshape(dims["integration"], npsf, -1), ("integration", "psf")
    else:
        values, leading = values.reshape(-1, npsf, values.shape[-1])[0], ("psf",)
    found = {"shift": xr.DataArray(values[..., :3], dims=(*leading, "param"), attrs=attrs)}
    if values.shape[-1] == 4:
        found["converged"] = xr.DataArray(values[..., 3] > 0, dims=leading)
    return found


def _references(table: dict, npsf: int) -> dict[str, tuple]:
    """What each reference is, from the ALIGN table's first ``npsf`` rows (its rows are
    integration-major: those of the first integration name every reference once), as
    ``psf`` coordinates (``REFERENCE_COLUMNS``), text as str."""
    columns = table.dtype.names if isinstance(table, np.ndarray) else list(table)
    coords = {}
    for column, name in REFERENCE_COLUMNS.items():
        if column not in columns:
            continue
        values = np.asarray(table[column])[:npsf]
        if values.dtype.kind in "iuf":  # in this machine's byte order
            values = values.astype(values.dtype.newbyteorder("="))
        else:  # text, as a FITS table (bytes) or a Zarr store (strings) holds it
            values = np.array(
                [(v.decode() if isinstance(v, bytes) else str(v)).strip() for v in values]
            )
        coords[name] = ("psf", values)
    return coords


def _keywords(header: object) -> dict:
    """A FITS header as attributes: structural keywords out, HISTORY as a list of entries
    (a card indented by two spaces continues the entry before it, as ``fits_layout``
    wraps them), as a Zarr store keeps them."""
    out = header_keywords(header)
    if "HISTORY" in header:
        entries: list[str] = []
        for card in (str(entry) for entry in header["HISTORY"]):
            if card.startswith("  ") and entries:
                entries[-1] += " " + card.strip()
            else:
                entries.append(card)
        out["HISTORY"] = entries
    return out


def _fits_contents(path: Path) -> Contents:
    """A FITS product's contents, from its headers (and the ALIGN table's rows)."""
    primary, *extensions = read_headers(path)
    contents = Contents(_keywords(primary.header), [])
    for hdu in extensions:
        header = hdu.header
        if header.get("ZIMAGE"):  # a tile-compressed image, stored as a table
            check_plain(path, hdu.name, header)
        if header.get("XTENSION", "").strip() == "BINTABLE":
            if hdu.name == "ALIGN":
                contents.align = read_table(path, hdu)
                contents.align_to = header.get("ALIGN_TO", "")
            continue
        if header.get("XTENSION", "").strip() != "IMAGE" or header["NAXIS"] == 0:
            continue
        check_plain(path, hdu.name, header)
        shape = tuple(header[f"NAXIS{i}"] for i in range(header["NAXIS"], 0, -1))
        source = FitsExtension(path.resolve(), hdu.offset, shape, _image_dtype(header))
        stored = (1,) * (len(shape) - 2) + shape[-2:]
        contents.images.append(Image(hdu.name, source, _keywords(header), stored))
    return contents


def _zarr_contents(path: Path) -> Contents:
    """A Zarr store's contents, from its metadata (and the ALIGN group's columns)."""
    primary, arrays, tables = read_store(path)
    images = [Image(source.name, source, keywords, stored) for source, keywords, stored in arrays]
    contents = Contents(primary, images)
    if "ALIGN" in tables:
        contents.align, keywords = tables["ALIGN"]
        contents.align_to = keywords.get("ALIGN_TO", "")
    return contents


def _dataset(path: Path, contents: Contents, drop: set) -> xr.Dataset:
    """The Dataset of a product's ``contents``, the same whatever its format."""
    kind = product_kind(path)
    variables: dict = {}
    sizes: dict = {}
    for image in contents.images:
        shape = tuple(image.source.shape)
        dims = _dims(path, kind, image.name, len(shape))
        sizes.update(zip(dims, shape, strict=True))
        if image.name in drop:
            continue
        data = indexing.LazilyIndexedArray(_Slabs(image.source))
        variable = xr.Variable(dims, data, image.keywords)
        chunks = whole_frames(shape, np.dtype(image.source.dtype).itemsize, image.stored)
        variable.encoding["preferred_chunks"] = dict(zip(dims, chunks, strict=True))
        log.debug("%s: %s %s in chunks of %s frames", path.name, image.name, shape, chunks[:-2])
        variables[image.name] = variable
    by_preference = sorted(
        contents.images, key=lambda i: PRINCIPAL.index(i.name) if i.name in PRINCIPAL else 9
    )
    coords: dict = {}
    if by_preference:
        principal = by_preference[0]
        coords.update(_sky(principal.keywords, tuple(principal.source.shape[-2:])))
    if "integration" in sizes:
        coords["integration"] = np.arange(1, sizes["integration"] + 1)
    for name in ("psf", "set"):
        if name in sizes:
            coords[name] = np.arange(sizes[name])
    cubes = [i.keywords for i in by_preference if "KLMODE0" in i.keywords]
    if "kl" in sizes and cubes:
        coords["kl"] = [cubes[0][f"KLMODE{k}"] for k in range(sizes["kl"])]
    dataset = xr.Dataset(variables, coords=coords, attrs=contents.primary)
    if contents.align is not None and "shift" not in drop:
        keywords = {"ALIGN_TO": contents.align_to}
        dataset = dataset.assign(_alignment(contents.align, sizes, keywords))
        dataset = dataset.assign_coords(param=PARAMS)
        dataset = dataset.assign_coords(_references(contents.align, dataset.sizes["psf"]))
    return dataset.drop_vars(drop & set(dataset.variables))


def read_contents(path: Path) -> Contents:
    """What the product at ``path`` (a FITS file, or a Zarr store: a folder) holds, from its
    headers; CoronInputError (naming the file) for anything that is not a product."""
    if not path.exists():
        raise CoronInputError(path, "file not found")
    if product_kind(path) is None:
        raise CoronInputError(
            path, f"not a coron-dask product (its name ends in none of {', '.join(KINDS)})"
        )
    return _zarr_contents(path) if path.is_dir() else _fits_contents(path)


class CoronDaskBackend(BackendEntrypoint):
    """xarray's engine "coron_dask": ``xr.open_dataset(path, engine="coron_dask")``."""

    description = "coron-dask and jwst coronagraphic products (FITS, Zarr), lazily, dims named"
    url = "https://github.com/coron-dask"
    open_dataset_parameters = ("filename_or_obj", "drop_variables")

    def open_dataset(self, filename_or_obj, *, drop_variables=None) -> xr.Dataset:
        path = Path(filename_or_obj)
        contents = read_contents(path)
        log.debug("%s: %d image(s) opened from its headers", path, len(contents.images))
        return _dataset(path, contents, set(drop_variables or ()))

    def guess_can_open(self, filename_or_obj) -> bool:
        try:
            path = Path(filename_or_obj)
        except TypeError:
            return False
        return path.suffix in (".fits", ".zarr") and product_kind(path) is not None


def open_product(path: str | Path, chunks: dict | None = None) -> xr.Dataset:
    """A product (FITS, or a Zarr store) as a lazy Dataset with named dimensions, in chunks
    of whole frames of about dask's ``array.chunk-size`` by default (``chunks``: xarray's)."""
    return xr.open_dataset(
        Path(path), engine="coron_dask", chunks=chunks if chunks is not None else {}
    )
