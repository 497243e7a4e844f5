"""Detection map and candidates of an i2d: the signal-to-noise of every pixel against its
annulus, with the statistics of the contrast curve (``photometry.snr_map``: Mawet et al.
2014), and the sources above a threshold with their places on the sky.

Written beside the i2d as ``<product>_snr.fits`` (SNR and SIGNIF: the Student-t S/N and
its Gaussian-equivalent significance, one plane per KL cutoff, with the i2d's WCS) and
``<product>_candidates.ecsv`` (one row per candidate and KL cutoff). Both are lazy
products built on the i2d's own lazy image (``detection_products``): a run computes them
with its other products and places them all together, whole or not at all; ``detect``
makes them for an i2d on disk.
"""

import io
import logging
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from astropy.io import fits
from astropy.table import Table, vstack
from astropy.wcs import WCS
from dask.base import tokenize
from dask.local import get_sync

from coron_dask.core.errors import CoronInputError
from coron_dask.io import Extension, Product, open_product, write_products
from coron_dask.io.fits_layout import fits_headers
from coron_dask.io.text_file import text_extension
from coron_dask.io.zarr_store import json_safe
from coron_dask.science.geometry import (
    lambda_over_d,
    pixel_positions,
    pixel_scale_arcsec,
    star_position,
)
from coron_dask.science.photometry import find_candidates, snr_map

log = logging.getLogger(__name__)

#: Significance (Gaussian σ) above which a source is a candidate.
THRESHOLD = 5.0


def plane_maps(block: np.ndarray, star: tuple[float, float], resolution: float) -> np.ndarray:
    """The S/N and significance (float64) of each plane of ``block`` (kl, y, x): (kl, 2, y, x)."""
    planes = [snr_map(plane.astype(np.float64), star, resolution) for plane in block]
    return np.stack([np.stack(maps) for maps in planes])


def plane_candidates(
    maps: np.ndarray,
    cutoffs: list[int],
    star: tuple[float, float],
    resolution: float,
    threshold: float,
    grid: WCS,
    block_info: dict | None = None,
) -> np.ndarray:
    """The candidates of the plane of ``maps`` (``plane_maps``' block: 1, 2, y, x), with
    its KL cutoff of ``cutoffs`` as a column if any, as one astropy Table in a
    one-element object array."""
    (snr, significance), k = maps[0], block_info[0]["chunk-location"][0]
    table = find_candidates(
        significance, snr, threshold, resolution=resolution, star=star, wcs=grid
    )
    if cutoffs:
        table["kl"] = np.full(len(table), cutoffs[k], dtype=int)
    return np.array([table], dtype=object)


def candidates_text(tables: np.ndarray, keywords: dict) -> np.ndarray:
    """The candidates of every plane (``plane_candidates``', in order) as the text of one
    ECSV table with ``keywords`` its metadata, in a one-element object array: a text
    product's block."""
    candidates = vstack(list(tables)) if len(tables) else Table()
    candidates.meta.update(keywords)
    text = io.StringIO()
    candidates.write(text, format="ascii.ecsv")
    log.info(
        "detection: %d candidate(s) above %gσ in %s (λ/D %.2f px)",
        len(candidates),
        keywords["threshold_sigma"],
        keywords["i2d"],
        keywords["resolution_pixels"],
    )
    return np.array([text.getvalue()], dtype=object)


def detection_of(
    sci: da.Array,
    primary: dict,
    header: dict,
    i2d: Path,
    *,
    cutoffs: list[int],
    keywords: dict | None = None,
    resolution: float | None = None,
    threshold: float = THRESHOLD,
) -> list[Product]:
    """The detection map and candidates of the i2d ``i2d`` whose lazy SCI is ``sci`` (kl, y,
    x or y, x; ``cutoffs`` the KL cutoffs of its planes) and whose primary and SCI
    keywords, as a reader of the file sees them, are ``primary`` and ``header``: lazy
    products, nothing computed. ``keywords``: the primary keywords of the map (default
    ``primary``). The star is at TARG_RA, TARG_DEC; ``resolution``: λ/D in pixels
    (default: from the FILTER's pivot wavelength). CoronInputError where either is not
    known."""
    grid = WCS({k: v for k, v in header.items() if not isinstance(v, list)}, naxis=2)
    star = tuple(float(v) for v in pixel_positions(grid, star_position(primary, i2d))[0])
    if resolution is None:
        resolution = lambda_over_d(primary.get("FILTER", "?"), pixel_scale_arcsec(grid) / 3600)
    log.info("detection: map and candidates of %s (λ/D %.2f px)", i2d.name, resolution)
    planes = (sci if sci.ndim == 3 else sci[None]).rechunk((1, -1, -1))
    token = tokenize(planes, star, resolution, threshold, cutoffs, i2d.name)
    maps = da.map_blocks(
        plane_maps,
        planes,
        star=star,
        resolution=resolution,
        new_axis=1,
        chunks=(planes.chunks[0], (2,), *planes.chunks[1:]),
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0), np.float64),
        name=f"detection-map-{token}",
    )
    table_keywords = {
        "i2d": i2d.name,
        "threshold_sigma": threshold,
        "resolution_pixels": resolution,
        "star_pixel": list(star),
    }
    tables = da.map_blocks(  # each plane's, as its maps are made
        plane_candidates,
        maps,
        cutoffs=cutoffs,
        star=star,
        resolution=resolution,
        threshold=threshold,
        grid=grid,
        drop_axis=(1, 2, 3),
        chunks=(maps.chunks[0],),
        dtype=object,
        meta=np.empty((0,), object),
        name=f"detection-candidates-{token}",
    )
    text = da.map_blocks(
        candidates_text,
        tables.rechunk(-1),
        keywords=table_keywords,
        chunks=((1,),),
        dtype=object,
        meta=np.empty((0,), object),
        name=f"detection-table-{token}",
    )
    stem = i2d.name.removesuffix(i2d.suffix).removesuffix("_i2d")
    snr_path = i2d.with_name(f"{stem}_snr{i2d.suffix}")  # in the i2d's format
    sci_keywords = {
        **dict(grid.to_header()),
        **{k: v for k, v in header.items() if k.startswith("KLMODE")},
    }
    dims = ("kl", "y", "x") if cutoffs else ("y", "x")
    extensions = [
        Extension(name, (maps[:, index] if cutoffs else maps[0, index]), sci_keywords, dims)
        for name, index in (("SNR", 0), ("SIGNIF", 1))
    ]
    for extension in extensions:
        extension.data = extension.data.astype(np.float32)
    # the i2d's record of how it was made: the map is made from it
    snr = Product(snr_path, {**(keywords or primary), "FILENAME": snr_path.name}, extensions)
    candidates = Product(
        i2d.with_name(f"{stem}_candidates.ecsv"), {}, [text_extension("ECSV", text)]
    )
    return [snr, candidates]


def _as_written(product: Product) -> tuple[dict, dict]:
    """The primary and SCI keywords of ``product`` as a reader of its file will see them
    (a FITS card holds a float to 16 digits): the detection of a run is bit for bit that of
    its i2d read back."""
    index = next(i for i, e in enumerate(product.extensions) if e.name == "SCI")
    if product.path.suffix == ".zarr":
        return json_safe(product.primary), json_safe(product.extensions[index].keywords)
    primary, *headers = fits_headers(product)
    read = [fits.Header.fromstring(h.decode("ascii")) for h in (primary, headers[index])]
    return tuple(
        {k: v for k, v in header.items() if k not in ("HISTORY", "COMMENT")} for header in read
    )


def detection_products(products: list[Product]) -> list[Product]:
    """The detection map and candidates of the i2d among a run's lazy ``products``, built on
    its lazy image (none without an i2d); skipped, with a warning, where the star's place
    or the resolution element cannot be known."""
    i2d = next((p for p in products if p.kind == "i2d" and not p.scratch), None)
    if i2d is None:
        return []
    primary, header = _as_written(i2d)
    sci = next(e for e in i2d.extensions if e.name == "SCI").data
    count = sci.shape[0] if sci.ndim == 3 else 0
    cutoffs = [int(header[f"KLMODE{i}"]) for i in range(count)]
    try:
        return detection_of(sci, primary, header, i2d.path, cutoffs=cutoffs, keywords=i2d.primary)
    except CoronInputError as error:
        log.warning("detection map not made: %s", error)
        return []


def detect(
    i2d: str | Path, resolution: float | None = None, threshold: float = THRESHOLD
) -> list[Path]:
    """Write the detection map and the candidates of the i2d on disk ``i2d`` (FITS or
    Zarr), in this thread; return their paths. ``resolution``: λ/D in pixels (default: from
    the FILTER's pivot wavelength); the star is at TARG_RA, TARG_DEC of the primary
    header."""
    i2d = Path(i2d)
    product = open_product(i2d)
    cutoffs = [int(k) for k in product["kl"].values] if "kl" in product.dims else []
    made = detection_of(
        product["SCI"].data,
        product.attrs,
        product["SCI"].attrs,
        i2d,
        cutoffs=cutoffs,
        resolution=resolution,
        threshold=threshold,
    )
    return write_products(made, lambda *writes: dask.compute(*writes, scheduler=get_sync))
