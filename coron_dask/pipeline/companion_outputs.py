"""What measuring companions reads back and writes last: the S/N of an i2d at a fitted
companion's place (``i2d_snr``), and the table and quicklooks, each placed whole
(``write_companion_products``)."""

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from coron_dask.science.companion_result import CompanionFit
from coron_dask.science.geometry import pixel_positions, pixel_scale_arcsec
from coron_dask.science.photometry import snr_map

__all__ = ["i2d_snr", "write_companion_products"]


def i2d_snr(path: Path, fit: CompanionFit, cutoffs: list[int], resolution: float) -> float:
    """The i2d's S/N (``photometry.snr_map``: the pixel against its annulus, λ/D wide) at
    the pixel nearest ``fit``'s place, on its KL cutoff's plane; ``resolution`` λ/D in the
    science frames' pixels."""
    with fits.open(path) as hdul:
        data, header = hdul["SCI"].data.astype(np.float64), hdul["SCI"].header
    if data.ndim == 3:
        data = data[cutoffs.index(fit.cutoff)]
    grid = WCS(header, naxis=2)
    star = pixel_positions(grid, fit.model.star)[0]
    x, y = pixel_positions(grid, fit.sky_place)[0]
    scale = pixel_scale_arcsec(grid) / pixel_scale_arcsec(fit.model.rolls[0].wcs)
    snr, _ = snr_map(data, (float(star[0]), float(star[1])), resolution / scale)
    return float(snr[round(float(y)), round(float(x))])


def write_companion_products(
    table, fits_found: list[CompanionFit], output_dir: Path, name: str
) -> list[Path]:
    """``<name>_companions.ecsv`` and a quicklook PNG per companion (with the residual
    i2d's S/N where the table has it, ``residual_snr``), each placed whole (a partial file
    renamed); the paths written."""
    # matplotlib: imported once there is something to draw
    from coron_dask.quicklook.companion_figure import companion_figure

    ecsv = output_dir / f"{name}_companions.ecsv"
    partial = ecsv.with_name(ecsv.name + ".partial")
    table.write(partial, format="ascii.ecsv", overwrite=True)
    partial.replace(ecsv)
    written = [ecsv]
    residual = table["residual_snr"] if "residual_snr" in table.colnames else [None] * len(table)
    for number, (fit, left) in enumerate(zip(fits_found, residual, strict=True), 1):
        path = output_dir / f"{name}_companion{number}.png"
        written.append(companion_figure(fit, path, residual_snr=left))
    return written
