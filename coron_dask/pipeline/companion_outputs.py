"""What measuring companions reads back and writes last: the S/N of an i2d at a fitted
companion's place (``i2d_snr``), the table with its provenance (``fitted_table``), and
the table and quicklooks, each placed whole (``write_companion_products``)."""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from coron_dask.pipeline.provenance import read_provenance
from coron_dask.science.companion_result import CompanionFit
from coron_dask.science.companion_table import companions_table
from coron_dask.science.geometry import pixel_positions, pixel_scale_arcsec
from coron_dask.science.photometry import snr_map

__all__ = ["fitted_table", "i2d_snr", "write_companion_products"]


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


def fitted_table(
    found: list[CompanionFit],
    exposure: xr.Dataset,
    provenance: Mapping[str, object],
    *,
    i2d: Path | None,
    residual: Path | None,
    cutoffs: list[int],
    resolution: float,
    offaxis_psf: str | Path,
    transmission_source: str,
    star_position_error: float,
    plate_scale_error: float,
) -> Table:
    """The companions' table (``science.companion_table``): the fluxes in the science
    ``exposure``'s BUNIT, the S/N of the ``i2d`` and of the ``residual`` i2d at each fitted
    place (None: no such column), the astrometric errors added (mas, fraction), and in its
    meta the reduction's ``provenance`` (a product's primary keywords), the off-axis PSF,
    the transmission's source and λ/D in pixels."""
    unit = exposure["sci"].attrs.get("BUNIT") or exposure.attrs.get("BUNIT", "")
    table = companions_table(
        found,
        i2d_snr=None if i2d is None else [i2d_snr(i2d, f, cutoffs, resolution) for f in found],
        flux_unit=str(unit),
        star_position_error=star_position_error / 1000.0,
        plate_scale_error=plate_scale_error,
    )
    if residual is not None:  # the column the quicklooks show
        table["residual_snr"] = [i2d_snr(residual, f, cutoffs, resolution) for f in found]
        table["residual_snr"].description = "S/N of the residual i2d (companions subtracted) there"
        table.meta["residual_i2d"] = residual.name
    record = read_provenance(provenance)
    record["date"] = record["date"].isoformat()
    record["parameters"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in record["parameters"].items()
    }
    table.meta["provenance"] = record
    table.meta["offaxis_psf"] = Path(offaxis_psf).name
    table.meta["transmission_source"] = transmission_source
    table.meta["resolution_pixels"] = float(resolution)
    return table


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
