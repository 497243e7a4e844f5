"""Detection map and candidates of an i2d: the signal-to-noise of every pixel against its
annulus, with the statistics of the contrast curve (``photometry.snr_map``: Mawet et al.
2014), and the sources above a threshold with their places on the sky.

Written beside the i2d as ``<product>_snr.fits`` (SNR and SIGNIF: the Student-t S/N and
its Gaussian-equivalent significance, one plane per KL cutoff, with the i2d's WCS) and
``<product>_candidates.ecsv`` (one row per candidate and KL cutoff).
"""

import logging
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from astropy.table import Table, vstack
from astropy.wcs import WCS
from dask.local import get_sync

from coron_dask.core.errors import CoronInputError
from coron_dask.io import Extension, Product, open_product, write_products
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


def detect(
    i2d: str | Path, resolution: float | None = None, threshold: float = THRESHOLD
) -> list[Path]:
    """Write the detection map and the candidates of the FITS ``i2d``; return their paths.

    ``resolution``: λ/D in pixels (default: from the FILTER's pivot wavelength); the star is
    at TARG_RA, TARG_DEC of the primary header."""
    i2d = Path(i2d)
    product = open_product(i2d)
    primary, header = product.attrs, product["SCI"].attrs
    # one small image, read and its maps written in this thread (no scheduler looked for)
    image = product["SCI"].data.compute(scheduler=get_sync).astype(np.float64)
    grid = WCS({k: v for k, v in header.items() if not isinstance(v, list)}, naxis=2)
    star = tuple(float(v) for v in pixel_positions(grid, star_position(primary, i2d))[0])
    if resolution is None:
        resolution = lambda_over_d(primary.get("FILTER", "?"), pixel_scale_arcsec(grid) / 3600)
    cutoffs = [int(k) for k in product["kl"].values] if "kl" in product.dims else []
    planes = image if image.ndim == 3 else image[None]
    maps, found = [], []
    for k, plane in enumerate(planes):
        snr, significance = snr_map(plane, star, resolution)
        maps.append((snr, significance))
        table = find_candidates(
            significance, snr, threshold, resolution=resolution, star=star, wcs=grid
        )
        if cutoffs:
            table["kl"] = np.full(len(table), cutoffs[k], dtype=int)
        found.append(table)
    candidates = vstack(found) if found else Table()
    candidates.meta.update(
        {
            "i2d": i2d.name,
            "threshold_sigma": threshold,
            "resolution_pixels": resolution,
            "star_pixel": list(star),
        }
    )
    stem = i2d.name.removesuffix(i2d.suffix).removesuffix("_i2d")
    snr_path = i2d.with_name(f"{stem}_snr{i2d.suffix}")  # in the i2d's format
    sci_keywords = {
        **dict(grid.to_header()),
        **{k: v for k, v in header.items() if k.startswith("KLMODE")},
    }
    dims = ("kl", "y", "x") if cutoffs else ("y", "x")
    extensions = []
    for name, index in (("SNR", 0), ("SIGNIF", 1)):
        planes = np.stack([m[index] for m in maps]).astype(np.float32)
        data = planes if cutoffs else planes[0]
        extensions.append(Extension(name, da.from_array(data, chunks=-1), sci_keywords, dims))
    # the i2d's record of how it was made: the map is made from it
    (snr_path,) = write_products(
        [Product(snr_path, {**primary, "FILENAME": snr_path.name}, extensions)],
        compute=lambda *writes: dask.compute(*writes, scheduler=get_sync),
    )
    table_path = i2d.with_name(f"{stem}_candidates.ecsv")
    partial = table_path.with_name(table_path.name + ".partial")
    candidates.write(partial, format="ascii.ecsv", overwrite=True)
    partial.replace(table_path)
    log.info(
        "detection: %d candidate(s) above %gσ in %s (λ/D %.2f px)",
        len(candidates),
        threshold,
        i2d.name,
        resolution,
    )
    return [snr_path, table_path]


def detection_products(paths: list[Path]) -> list[Path]:
    """``detect`` on the i2d among a run's ``paths`` (none without one); skipped, with a
    warning, where the resolution element cannot be known."""
    i2d = next((p for p in paths if p.name.removesuffix(p.suffix).endswith("_i2d")), None)
    if i2d is None:
        return []
    try:
        return detect(i2d)
    except CoronInputError as error:
        log.warning("detection map not made: %s", error)
        return []
