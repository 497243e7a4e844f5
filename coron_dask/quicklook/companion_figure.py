"""A companion's quicklook (``<product>_companion<N>.png``): per roll the data on the fit's
window (the integration-mean psfsub), the forward model at the posterior medians and the
residual, all three with one colour stretch; and a corner plot of separation, position
angle and contrast with the medians and 68 % intervals marked."""

from pathlib import Path

import numpy as np

from coron_dask.quicklook.drawing import figure_and_axes, residual_cmap, save
from coron_dask.science.companion_result import CompanionFit

LABELS = ("separation (arcsec)", "PA (deg E of N)", "contrast")


def _corner(figure, grid, first: int, fit: CompanionFit) -> None:
    """The corner plot of the fit's samples in ``grid``'s 3 × 3 cells from row ``first``."""
    samples = fit.samples
    estimates = (fit.separation, fit.position_angle, fit.contrast)
    angles = samples[:, 1] % 360.0
    angles = np.where(angles - estimates[1].median > 180, angles - 360, angles)
    angles = np.where(estimates[1].median - angles > 180, angles + 360, angles)
    columns = [samples[:, 0], angles, samples[:, 2]]
    for i in range(3):
        for j in range(i + 1):
            axes = figure.add_subplot(grid[first + i, j])
            if i == j:
                axes.hist(columns[i], bins=30, histtype="step", color="k")
                e = estimates[i]
                for value in (e.median - e.minus, e.median, e.median + e.plus):
                    axes.axvline(value, color="C0", ls="-" if value == e.median else "--")
                axes.set_title(f"{e.median:.4g} −{e.minus:.2g} +{e.plus:.2g}", fontsize="small")
                axes.set_yticks([])
            else:
                axes.hist2d(columns[j], columns[i], bins=30, cmap="Greys")
            axes.tick_params(labelsize="x-small")
            if i == 2:
                axes.set_xlabel(LABELS[j], fontsize="small")
            if j == 0 and i > 0:
                axes.set_ylabel(LABELS[i], fontsize="small")


def companion_figure(
    fit: CompanionFit, path: str | Path, residual_snr: float | None = None
) -> Path:
    """Draw ``fit``'s quicklook (see the module's docstring) into ``path``; with the S/N
    of the residual i2d at its place (``residual_snr``) in the title."""
    best = fit.best_models()
    rolls = len(best)
    figure, _ = figure_and_axes(figsize=(9.5, 3.0 * rolls + 6.5))
    figure.delaxes(figure.axes[0])
    grid = figure.add_gridspec(rolls + 3, 3, height_ratios=[3.0] * rolls + [2.1] * 3)
    cmap = residual_cmap()
    for k, panels in enumerate(best):
        finite = np.abs(panels["data"][np.isfinite(panels["data"])])
        limit = float(np.max(finite)) if finite.size else 1.0
        for column, key in enumerate(("data", "model", "residual")):
            axes = figure.add_subplot(grid[k, column])
            shown = axes.imshow(panels[key], origin="lower", cmap=cmap, vmin=-limit, vmax=limit)
            axes.set_title(f"roll {k + 1}: {key}", fontsize="small")
            axes.set_xticks([])
            axes.set_yticks([])
        figure.colorbar(shown, ax=axes, fraction=0.046)
    _corner(figure, grid, rolls, fit)
    figure.suptitle(
        f"{fit.name}: KL {fit.cutoff}, S/N {fit.snr:.1f}"
        + ("" if residual_snr is None else f", residual i2d S/N {residual_snr:.1f}")
        + ("" if fit.converged else " (chain NOT converged)"),
        fontsize="medium",
    )
    return save(figure, Path(path))
