"""The companions' table (``<product>_companions.ecsv``): one row per fitted companion
(``science.companion_result.CompanionFit``), with the star-position and plate-scale
uncertainties the data give added in quadrature to its astrometry.

Astrometric errors: the fit's 68 % half-intervals (−, +) of separation ρ, position angle θ
and the offsets (east, north) are each widened as
``σ² + σ_star² + (f·value)²`` for ρ, east and north (σ_star the star-position error in
arcsec, f the plate scale's fractional error, which scales every offset from the star) and
``σ² + (σ_star/ρ)²`` for θ (radians; a plate-scale error leaves angles alone). Contrast and
flux are left as fitted."""

import numpy as np
from astropy.table import Table

from coron_dask.science.companion_result import CompanionFit, Estimate

#: The fitted parameters in the correlation matrix's order.
PARAMETERS = ("separation", "pa", "contrast")


def widened(
    estimate: Estimate, star_error: float, scale_error: float, *, angle: float | None = None
) -> Estimate:
    """``estimate`` with the star-position error (arcsec) and the plate scale's fractional
    error added in quadrature (see the module's docstring); for a position angle (degrees),
    ``angle`` is the separation (arcsec) the star's error is turned into an angle at."""
    if angle is not None:
        extra = np.degrees(star_error / angle) if angle > 0 else 0.0
    else:
        extra = np.hypot(star_error, scale_error * abs(estimate.median))
    return Estimate(
        estimate.median,
        float(np.hypot(estimate.minus, extra)),
        float(np.hypot(estimate.plus, extra)),
    )


def companions_table(
    fits: list[CompanionFit],
    *,
    flux_unit: str,
    star_position_error: float = 0.0,
    plate_scale_error: float = 0.0,
    i2d_snr: list[float] | None = None,
) -> Table:
    """One row per fit (see the module's docstring). ``flux_unit``: the calints' BUNIT (the
    flux is contrast × the off-axis PSF's sum, in those units summed over pixels);
    ``star_position_error`` in arcsec, ``plate_scale_error`` a fraction; ``i2d_snr`` the
    i2d's S/N at each fitted place (None: no i2d)."""
    rows = []
    for number, fit in enumerate(fits):
        separation = widened(fit.separation, star_position_error, plate_scale_error)
        estimates = {
            "separation": separation,
            "pa": widened(
                fit.position_angle, star_position_error, 0.0, angle=fit.separation.median
            ),
            "east": widened(fit.east, star_position_error, plate_scale_error),
            "north": widened(fit.north, star_position_error, plate_scale_error),
            "contrast": fit.contrast,
            "flux": fit.flux,
        }
        row: dict = {"name": fit.name}
        for name, estimate in estimates.items():
            row[name] = estimate.median
            row[f"{name}_minus"] = estimate.minus
            row[f"{name}_plus"] = estimate.plus
        row["snr"] = fit.snr
        row["snr_i2d"] = np.nan if i2d_snr is None else i2d_snr[number]
        row["kl"] = fit.cutoff
        row["model"] = "exact RDI forward model"
        row["noise"] = "; ".join(
            f"{n.kernel}: sigma {n.sigma:.4g}, length {n.length:.3f} px, share {n.share:.2f}"
            for n in fit.noise
        )
        row["noise_sigma"] = float(np.mean([n.sigma for n in fit.noise]))
        row["noise_length"] = float(np.mean([n.length for n in fit.noise]))
        row["kernel"] = fit.noise[0].kernel
        row["acceptance"] = fit.acceptance
        for name, tau in zip(PARAMETERS, fit.tau, strict=True):
            row[f"tau_{name}"] = float(tau)
        row["steps"], row["burn"], row["converged"] = fit.steps, fit.burn, bool(fit.converged)
        for i, first in enumerate(PARAMETERS):
            for j in range(i + 1, len(PARAMETERS)):
                row[f"corr_{first}_{PARAMETERS[j]}"] = float(fit.correlation[i, j])
        row["transmission"] = ",".join(f"{t:.4f}" for t in fit.transmissions)
        rows.append(row)
    table = Table(rows=rows) if rows else Table()
    for name, unit in (
        ("separation", "arcsec"),
        ("pa", "deg"),
        ("east", "arcsec"),
        ("north", "arcsec"),
        ("flux", flux_unit),
    ):
        for column in (name, f"{name}_minus", f"{name}_plus"):
            if column in table.colnames:
                table[column].unit = unit
    table.meta["pa"] = "degrees east of north"
    table.meta["east_north"] = "offsets from the star: east = dRA cos(Dec), north = dDec"
    table.meta["flux"] = f"contrast x the off-axis PSF's sum, in {flux_unit} summed over pixels"
    table.meta["snr"] = "the contrast's median over its 68 % half-interval"
    table.meta["snr_i2d"] = "the i2d's S/N (photometry.snr_map) at the fitted place's pixel"
    table.meta["transmission"] = "the coronagraph's at the companion's place, per roll"
    table.meta["star_position_error_arcsec"] = star_position_error
    table.meta["plate_scale_error"] = plate_scale_error
    table.meta["astrometric_errors"] = (
        "fit's 68 % half-intervals with the star-position error and the plate-scale error "
        "(times the offset) added in quadrature; PA with the star's error over the separation"
    )
    return table
