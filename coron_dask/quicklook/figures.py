"""The quicklook figures, each drawn from one product (``quicklook.reading``) into a PNG
(``quicklook.drawing``): a psfsub's mean over integrations, the i2d, the detection map,
the contrast curve and the alignment fits."""

from pathlib import Path

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.wcs import WCS
from matplotlib.colors import AsinhNorm
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from coron_dask.core.errors import CoronInputError
from coron_dask.quicklook.drawing import (
    asinh_ticks,
    circle_candidates,
    figure_and_axes,
    image_panels,
    nice_length,
    outlined,
    pixel_axes,
    residual_cmap,
    save,
    symmetric_limit,
)
from coron_dask.quicklook.reading import Choice, mean_over_integrations, read_choice, read_image
from coron_dask.science.geometry import compass, pixel_scale_arcsec

#: The shifts figure's lines of each kind of reference (psfalign's KIND): colour of each
#: reference's, dashes of their mean; and their legend's labels.
SHIFT_STYLES = {"RDI": ("C0", "-"), "ADI": ("C1", "--")}
SHIFT_LABELS = {
    "RDI": lambda n: (f"reference star's frames ({n})", "their mean"),
    "ADI": lambda n: (f"other rolls' integrations ({n})", "their mean"),
}


def _scalars(keywords: dict) -> dict:
    """Keywords a WCS is read from: lists (HISTORY) and mappings left out."""
    return {k: v for k, v in keywords.items() if not isinstance(v, list | dict)}


def contrast_figure(table, path: str | Path) -> Path:
    """The 5σ contrast against separation (arcsec, and λ/D on top), one curve per KL
    cutoff, log scale."""
    figure, axes = figure_and_axes(figsize=(6.4, 4.4))
    for cutoff in np.unique(table["kl"]):
        rows = table[table["kl"] == cutoff]
        axes.semilogy(rows["separation"], rows["contrast"], label=f"KL {cutoff}")
    axes.set_xlabel("separation (arcsec)")
    axes.set_ylabel(f"{table.meta.get('significance', 5):g}σ contrast")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="KLIP", fontsize="small")
    per_lambda_d = table.meta["resolution_pixels"] * table.meta["pixel_scale_arcsec"]
    top = axes.secondary_xaxis(
        "top", functions=(lambda s: s / per_lambda_d, lambda n: n * per_lambda_d)
    )
    top.set_xlabel("separation (λ/D)")
    figure.suptitle("contrast curve, calibrated by injection-recovery", fontsize="medium", y=1.02)
    return save(figure, Path(path))


def _zones(primary: dict) -> str:
    """Where KLIP reduced, as the psfsub's keywords record it (ANNULI, SUBSECTS, IWA,
    OWA)."""
    annuli, subsections = int(primary.get("ANNULI", 1)), int(primary.get("SUBSECTS", 1))
    iwa, owa = float(primary.get("IWA", 0.0)), primary.get("OWA", "none")
    if annuli * subsections == 1 and iwa == 0 and owa == "none":
        return "one zone, the whole frame"
    outer = "the frame's edge" if owa == "none" else f"{float(owa):g} px"
    return (
        f"{annuli * subsections} zones ({annuli} annuli × {subsections} subsections) from "
        f"{iwa:g} px to {outer} (grey: not reduced)"
    )


def reduction_lines(primary: dict, choice: Choice | None) -> list[str]:
    """What a psfsub's KLIP was, in a line or two of text: its references (KLIPMODE, ADI's
    MOVEMENT), its zones and, where it chose references per integration and zone (REFS),
    how many, how correlated and, with ADI, what share of the choices were the reference
    star's frames. Nothing for a product that records none of it (before KLIPMODE)."""
    mode = primary.get("KLIPMODE")
    if mode is None:
        return []
    moved = f" (movement {float(primary.get('MOVEMENT', 0)):g} px)" if "ADI" in mode else ""
    lines = [f"KLIP: {mode}{moved}, {_zones(primary)}"]
    if choice is not None:
        chosen = choice.indices[choice.indices >= 0]
        correlations = choice.correlations[choice.indices >= 0]
        kept = choice.indices.shape[-1]
        line = (
            f"references: the {kept} most correlated of {choice.references} per integration "
            f"and zone (REFS), correlation {correlations.min():.3f} to {correlations.max():.3f}"
        )
        if len(choice.kinds) and chosen.size:
            share = float(np.mean(choice.kinds[chosen] == "RDI"))
            line += f"; {share:.0%} of the choices the reference star's frames"
        lines.append(line)
    return lines


def psfsub_figure(path: str | Path, png: str | Path) -> Path:
    """The mean over integrations of a psfsub, one panel per KL cutoff (titled "KL n"),
    zero-centred colour map with robust limits: where KLIP left residuals, and where a
    companion stands out of them; below the title, how it was reduced
    (``reduction_lines``: grey is where no zone reached)."""
    path = Path(path)
    image = read_image(path, "SCI")
    try:
        means = mean_over_integrations(image)
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read its SCI ({error})") from None
    integrations = image.array.sizes.get("integration", 1)
    truncate = image.primary.get("TRUNCATE")
    titles = (
        [f"KL {k}" for k in image.cutoffs]
        if image.cutoffs
        else [f"KL {truncate}" if truncate not in (None, "") else "mean"]
    )
    unit = image.header.get("BUNIT", "")
    figure, panels = image_panels(len(means))
    cmap = residual_cmap()
    for axes, plane, title in zip(panels, means, titles, strict=True):
        limit = symmetric_limit(plane)
        shown = axes.imshow(
            plane, origin="lower", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest"
        )
        pixel_axes(axes, title)
        figure.colorbar(shown, ax=axes, shrink=0.9, label=unit or "value")
    title = [f"{path.name}: mean of {integrations} integration(s) after KLIP"]
    title += reduction_lines(image.primary, read_choice(path))
    figure.suptitle("\n".join(title), fontsize="medium")
    return save(figure, Path(png))


def i2d_figure(path: str | Path, candidates: Table | None, png: str | Path) -> Path:
    """The i2d (for a KL-mode cube, its largest cutoff) with an asinh stretch symmetric
    around 0 (the noise linear, bright residuals and companions compressed), a north/east
    compass and an arcsecond scale bar from its WCS, the star (TARG_RA, TARG_DEC) marked
    and the ``candidates`` of that cutoff circled with their significance."""

    path = Path(path)
    image = read_image(path, "SCI")
    cutoffs = image.cutoffs
    try:
        data = image.values(kl=int(np.argmax(cutoffs))) if cutoffs else image.values()
        if data.ndim != 2:
            raise ValueError(f"SCI has {data.ndim} axes where an image has 2")
        grid = WCS(_scalars(image.header), naxis=2)
        if not grid.has_celestial:
            raise ValueError("SCI has no celestial WCS")
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read its SCI ({error})") from None
    cutoff = max(cutoffs) if cutoffs else None
    limit = symmetric_limit(data, 99.9)
    finite = data[np.isfinite(data)]
    noise = 1.4826 * float(np.median(np.abs(finite - np.median(finite)))) if finite.size else 0
    linear = noise if 0 < noise < limit else limit / 100
    figure, axes = figure_and_axes(figsize=(6.6, 5.6), layout="constrained")
    shown = axes.imshow(
        data,
        origin="lower",
        cmap=residual_cmap(),
        norm=AsinhNorm(linear_width=linear, vmin=-limit, vmax=limit),
        interpolation="nearest",
    )
    unit = image.header.get("BUNIT", "")
    bar = figure.colorbar(shown, ax=axes, shrink=0.9, label=f"{unit or 'value'} (asinh stretch)")
    bar.set_ticks(asinh_ticks(limit, linear))
    bar.ax.yaxis.set_major_formatter("{x:.2g}")
    bar.minorticks_off()
    ny, nx = data.shape
    handles = []
    if "TARG_RA" in image.primary and "TARG_DEC" in image.primary:
        star = SkyCoord(
            float(image.primary["TARG_RA"]), float(image.primary["TARG_DEC"]), unit="deg"
        )
        sx, sy = (float(v) for v in grid.celestial.world_to_pixel(star))
        axes.plot(sx, sy, marker="+", markersize=14, mew=1.6, color="k", path_effects=outlined())
        handles.append(Line2D([], [], marker="+", color="k", ls="", markersize=10, label="star"))
    if circle_candidates(axes, candidates, cutoff):
        handles.append(
            Line2D(
                [], [], marker="o", mfc="none", color="k", ls="", markersize=10, label="candidate"
            )
        )
    # compass in the upper left, its arrows as long as 11 % of the image
    length = 0.11 * min(nx, ny)
    anchor = np.array([0.18 * nx, 0.82 * ny])
    for vector, letter in zip(compass(grid, *anchor), "NE", strict=True):
        tip = anchor + length * vector
        axes.annotate(
            "",
            xy=tip,
            xytext=anchor,
            arrowprops=dict(arrowstyle="-|>", color="k", lw=1.5, shrinkA=0, shrinkB=0),
        )
        label = anchor + 1.4 * length * vector
        axes.text(
            *label,
            letter,
            ha="center",
            va="center",
            fontweight="bold",
            path_effects=outlined(),
        )
    scale = pixel_scale_arcsec(grid)
    arcsec = nice_length(0.25 * nx * scale)
    axes.add_artist(
        AnchoredSizeBar(
            axes.transData,
            arcsec / scale,
            f'{arcsec:g}"',
            loc="lower right",
            frameon=False,
            color="k",
            size_vertical=max(ny / 150, 0.3),
        )
    )
    if handles:
        axes.legend(handles=handles, loc="upper right", fontsize="x-small", framealpha=0.7)
    axes.set_xlim(-0.5, nx - 0.5)
    axes.set_ylim(-0.5, ny - 0.5)
    which = f" — KL {cutoff}, the largest of {', '.join(map(str, cutoffs))}" if cutoffs else ""
    pixel_axes(axes, f"{path.name}{which}")
    return save(figure, Path(png))


def snr_figure(path: str | Path, candidates: Table | None, png: str | Path) -> Path:
    """The detection map's significance (SIGNIF: Gaussian-equivalent σ), one panel per KL
    cutoff, zero-centred, with that cutoff's candidates circled: what stands above the
    noise, and how the noise looks around it."""
    path = Path(path)
    image = read_image(path, "SIGNIF")
    try:
        data = image.values()
        planes = data if image.cutoffs else data[None]
        if planes.ndim != 3:
            raise ValueError(f"SIGNIF has {data.ndim} axes")
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read its SIGNIF ({error})") from None
    cutoffs = image.cutoffs or [None]
    threshold = 5.0 if candidates is None else float(candidates.meta.get("threshold_sigma", 5))
    figure, panels = image_panels(len(planes), width=4.6, height=4.0)
    cmap = residual_cmap()
    for axes, plane, cutoff in zip(panels, planes, cutoffs, strict=True):
        limit = max(symmetric_limit(plane), threshold)
        shown = axes.imshow(
            plane, origin="lower", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest"
        )
        found = circle_candidates(axes, candidates, cutoff)
        title = f"KL {cutoff}" if cutoff is not None else "significance"
        pixel_axes(axes, f"{title}: {found} candidate(s) > {threshold:g}σ")
        figure.colorbar(shown, ax=axes, shrink=0.9, label="significance (σ)")
    figure.suptitle(f"{path.name}: detection map", fontsize="medium")
    return save(figure, Path(png))


def shifts_figure(alignment: dict, exposure: str, png: str | Path) -> Path:
    """The alignment fits against science integration: DX and DY (pixels; the reference's
    offset from the science frame), one thin line per reference and their mean thick, and
    BETA (reference flux / science flux) below. Drifts, jumps and odd references show.
    With ADI (the record's KIND) the other rolls' integrations are drawn apart (orange,
    their mean dashed) from the reference star's frames."""
    integration = np.asarray(alignment["INTEGRATION"], dtype=int)
    psf = np.asarray(alignment["PSF"], dtype=int)
    steps, rows = np.unique(integration, return_inverse=True)
    references, columns = np.unique(psf, return_inverse=True)
    kind = np.full(len(references), "RDI", dtype=object)  # of each reference
    kind[columns] = np.asarray(alignment.get("KIND", kind[columns]), dtype=str)
    # the reference star's frames and the other rolls' integrations apart: their offsets
    # and flux ratios are of other stars and pointings, a mean over both is neither's
    groups = [(name, kind == name) for name in ("RDI", "ADI") if (kind == name).any()]
    figure, panels = figure_and_axes(figsize=(7.0, 7.2), nrows=3, sharex=True, layout="constrained")
    marker = "o" if len(steps) < 12 else None
    for axes, name, label in zip(
        panels,
        ("DX", "DY", "BETA"),
        ("DX (pixel)", "DY (pixel)", "BETA (flux ratio)"),
        strict=True,
    ):
        values = np.full((len(steps), len(references)), np.nan)
        values[rows, columns] = np.asarray(alignment[name], dtype=np.float64)
        for group, chosen in groups:
            colour, dashes = SHIFT_STYLES[group]
            part = values[:, chosen]
            axes.plot(steps, part, color=colour, lw=0.7, alpha=0.45, marker=marker, markersize=2.5)
            axes.plot(steps, np.nanmean(part, axis=1), color="k", lw=2.4, ls=dashes, marker=marker)
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    panels[-1].set_xlabel("science integration")
    panels[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    panels[-1].set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
    handles = []
    for group, chosen in groups:
        colour, dashes = SHIFT_STYLES[group]
        count = int(chosen.sum())
        what, mean = (
            (f"each reference ({count})", "mean")
            if len(groups) == 1
            else SHIFT_LABELS[group](count)
        )
        handles.append(Line2D([], [], color=colour, lw=0.7, label=what))
        handles.append(Line2D([], [], color="k", lw=2.4, ls=dashes, label=mean))
    figure.legend(handles=handles, fontsize="small", loc="outside lower center", ncols=2)
    aligned = {"first": "its first integration"}.get(
        alignment.get("ALIGN_TO"), "each science integration"
    )
    figure.suptitle(
        f"{exposure}: alignment fits of the references, aligned to {aligned}",
        fontsize="medium",
    )
    return save(figure, Path(png))
