"""What the quicklook figures read of a run's products, through ``io.open_product`` (FITS
or Zarr alike): an image extension with its keywords, a psfsub's mean over integrations
read an integration at a time, the alignment record (with ADI, which reference is which),
the references KLIP chose, the candidates and the contrast curve's table."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.table import Table

from coron_dask.core.errors import CoronInputError
from coron_dask.io import open_product


@dataclass
class Image:
    """An image extension of a product: the product's primary keywords, and the extension
    as a lazy DataArray (dimensions named, its own keywords as attributes)."""

    primary: dict
    array: xr.DataArray

    @property
    def header(self) -> dict:
        """The extension's keywords."""
        return self.array.attrs

    @property
    def cutoffs(self) -> list[int]:
        """The KL cutoffs of a KL-mode cube's planes (KLMODEn), empty for jwst's layout."""
        return [int(k) for k in self.array["kl"].values] if "kl" in self.array.dims else []

    def values(self, **where: int) -> np.ndarray:
        """The part of the image at the indices ``where`` (dimension: index) as float64,
        read in this thread (no scheduler looked for)."""
        part = self.array.isel(where) if where else self.array
        return np.asarray(part.data.compute(scheduler="synchronous"), dtype=np.float64)


def read_product(path: Path, what: str) -> xr.Dataset:
    """The product at ``path`` (FITS file or Zarr store), lazily; if unreadable, one line
    saying that ``what`` of it cannot be read."""
    try:
        return open_product(path)
    except CoronInputError as error:  # names the product already
        raise CoronInputError(error.source, f"cannot read {what}: {error.problem}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CoronInputError(path, f"cannot read {what} ({error})") from None


def read_image(path: Path, extension: str) -> Image:
    """``extension`` of the product at ``path`` (FITS file or Zarr store)."""
    product = read_product(path, f"its {extension}")
    if extension not in product.data_vars:
        raise CoronInputError(path, f"cannot read its {extension} (no such extension)")
    return Image(dict(product.attrs), product[extension])


def read_alignment(path: Path) -> dict[str, np.ndarray] | None:
    """The alignment record of a psfalign or psfsub as the figure draws it: INTEGRATION
    (1-based) and PSF of each row, DX, DY, BETA and ALIGN_TO; None where the product has
    none (made before the alignment record)."""
    product = read_product(path, "its ALIGN table")
    if "shift" not in product:
        return None
    shift = product["shift"]
    try:
        values = shift.transpose(..., "psf", "param").values.reshape(-1, shift.sizes["psf"], 3)
    except (OSError, ValueError, KeyError) as error:
        raise CoronInputError(path, f"cannot read its ALIGN table ({error})") from None
    integrations = shift["integration"].values if "integration" in shift.dims else np.array([1])
    npsf = shift.sizes["psf"]
    record = {
        "INTEGRATION": np.repeat(integrations, npsf),
        "PSF": np.tile(np.arange(npsf), len(integrations)),
        "ALIGN_TO": str(shift.attrs.get("ALIGN_TO", "")),
    }
    for k, name in enumerate(("DX", "DY", "BETA")):
        record[name] = values[..., k].ravel()
    if "psf_kind" in shift.coords:  # ADI: RDI (the reference star's) or ADI, per row
        record["KIND"] = np.tile(_values(shift["psf_kind"]), len(integrations))
    return record


def _values(array: xr.DataArray) -> np.ndarray:
    """A small DataArray's values, read in this thread (no scheduler looked for)."""
    return np.asarray(array.compute(scheduler="synchronous").values)


@dataclass
class Choice:
    """psfsub's record of the references KLIP chose (``--maxnumbasis``): for each
    (integration, zone), the indices into psfalign's psf axis (−1: none), most correlated
    first, their correlations, and the kind of each reference (RDI, ADI; empty: not
    recorded) of how many (``references``)."""

    indices: np.ndarray
    correlations: np.ndarray
    kinds: np.ndarray
    references: int


def read_choice(path: Path) -> Choice | None:
    """The references chosen that the psfsub at ``path`` records (REFS, REFCORR), or None
    where every reference was used (no REFS)."""
    product = read_product(path, "its REFS")
    if "REFS" not in product:
        return None
    try:
        indices = _values(product["REFS"]).astype(int)
        correlations = _values(product["REFCORR"]).astype(np.float64)
        kinds = _values(product["psf_kind"]) if "psf_kind" in product.coords else np.array([])
        references = product.sizes.get("psf", int(indices.max()) + 1)
    except (OSError, ValueError, KeyError) as error:
        raise CoronInputError(path, f"cannot read its REFS ({error})") from None
    return Choice(indices, correlations, kinds, references)


def read_candidates(path: Path) -> Table | None:
    """A ``*_candidates.ecsv`` table (x, y, significance, maybe kl), or None if absent."""
    if not path.exists():
        return None
    try:
        table = Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read the candidates ({error})") from None
    missing = {"x", "y", "significance"} - set(table.colnames)
    if len(table) and missing:
        raise CoronInputError(path, f"no column {', '.join(sorted(missing))}")
    return table


def read_contrast(path: Path) -> Table:
    """A ``*_contrast.ecsv`` curve, checked to hold what the figure draws."""
    try:
        table = Table.read(path, format="ascii.ecsv")
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read the contrast curve ({error})") from None
    missing = sorted(
        ({"kl", "separation", "contrast"} - set(table.colnames))
        | ({"resolution_pixels", "pixel_scale_arcsec"} - set(table.meta))
    )
    if missing:
        raise CoronInputError(path, f"not a contrast curve: no {', '.join(missing)}")
    return table


def mean_over_integrations(image: Image) -> np.ndarray:
    """The mean over integrations of a psfsub SCI, (planes, y, x): one plane per KL cutoff
    (a single plane in jwst's layout). Read one integration at a time, NaN left out; a
    pixel without data in every integration is NaN."""
    array = image.array
    if image.cutoffs and array.dims[:2] != ("kl", "integration"):
        raise ValueError(f"a KL-mode cube has 4 axes, this SCI has {array.ndim}")
    planes = array.sizes["kl"] if image.cutoffs else 1
    total = np.zeros((planes, array.sizes["y"], array.sizes["x"]))
    count = np.zeros_like(total)
    integrations = array.sizes.get("integration")
    for i in range(integrations or 1):
        block = image.values() if integrations is None else image.values(integration=i)
        block = block if image.cutoffs else block[None]
        finite = np.isfinite(block)
        total += np.where(finite, block, 0.0)
        count += finite
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)
