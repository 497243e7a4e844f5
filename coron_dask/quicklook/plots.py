"""Quicklook figures (PNG): what a person looks at first after a run.

``quicklook(outdir)`` draws, from the products in ``outdir`` (FITS, or Zarr stores):

- ``<psfsub stem>_mean.png``: each psfsub's mean over integrations, one panel per KL cutoff;
- ``<product>_i2d.png``: the i2d (its largest KL cutoff), with a north/east compass, a scale
  bar, the star and the candidates;
- ``<product>_snr.png``: the detection map's significance, candidates circled;
- ``<product>_contrast.png``: the contrast curve, redrawn from its ECSV;
- ``<exposure>_shifts.png``: the alignment fits (DX, DY, BETA) against science integration.

Figures are drawn on matplotlib ``Figure`` objects with the Agg renderer, never through
pyplot's global state (a notebook's backend is left alone); every figure is written to a
partial file and renamed, so a PNG appears whole or not at all.
"""

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from coron_dask.core.errors import CoronInputError

log = logging.getLogger(__name__)

#: Diverging colour map for residuals and significance: white at zero; no data in grey.
RESIDUAL_CMAP = "RdBu_r"
NO_DATA = "0.75"
#: Percentile of |value| that sets the colour limits of residual images.
ROBUST_PERCENTILE = 99.5
#: The product kinds ``quicklook`` recognises, by the ending of their names.
KINDS = ("psfsub", "psfalign", "i2d", "snr", "contrast")


def _figure(**options):
    """A figure and its axes (``Figure.subplots`` options), drawn off-screen by Agg."""
    from matplotlib.figure import Figure

    layout = options.pop("layout", None)
    figure = Figure(figsize=options.pop("figsize", None), layout=layout)
    return figure, figure.subplots(**options)


def _save(figure, path: Path) -> Path:
    """Write ``figure`` as PNG to a partial file and rename it onto ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    partial = path.with_name(path.name + ".partial.png")
    try:
        figure.savefig(partial, dpi=110, bbox_inches="tight")
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def contrast_figure(table, path: str | Path) -> Path:
    """The 5σ contrast against separation (arcsec, and λ/D on top), one curve per KL
    cutoff, log scale."""
    figure, axes = _figure(figsize=(6.4, 4.4))
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
    return _save(figure, Path(path))


# --- reading products (FITS or Zarr) -------------------------------------------------------


@dataclass
class _Image:
    """An image extension of a product: its primary and own keywords, and its data (a
    FITS memory map or a Zarr array: sliced, never read whole by the readers)."""

    primary: fits.Header
    header: fits.Header
    data: object

    @property
    def cutoffs(self) -> list[int]:
        """The KL cutoffs of a KL-mode cube's planes (KLMODEn), empty for jwst's layout."""
        cutoffs, n = [], 0
        while f"KLMODE{n}" in self.header:
            cutoffs.append(int(self.header[f"KLMODE{n}"]))
            n += 1
        return cutoffs


def _keywords(attributes: dict) -> fits.Header:
    """A Zarr store's attributes as FITS keywords (lists, such as HISTORY, left out)."""
    return fits.Header(
        {k: v for k, v in attributes.items() if len(k) <= 8 and not isinstance(v, list | dict)}
    )


def _read_image(path: Path, extension: str) -> _Image:
    """``extension`` of the product at ``path`` (FITS file or Zarr store)."""
    try:
        if path.suffix == ".zarr":
            import zarr

            group = zarr.open_group(str(path), mode="r")
            array = group[extension]
            return _Image(_keywords(dict(group.attrs)), _keywords(dict(array.attrs)), array)
        with fits.open(path, memmap=True) as hdul:
            hdu = hdul[extension]
            data = hdu.data
            if data is None:
                raise ValueError(f"{extension} has no data")
            return _Image(hdul[0].header.copy(), hdu.header.copy(), data)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CoronInputError(path, f"cannot read its {extension} ({error})") from None


def _read_alignment(path: Path) -> dict[str, np.ndarray] | None:
    """The ALIGN table of a psfalign or psfsub (INTEGRATION, PSF, DX, DY, BETA), or None
    where the product has none (made before the alignment record)."""
    columns = ("INTEGRATION", "PSF", "DX", "DY", "BETA")
    try:
        if path.suffix == ".zarr":
            import zarr

            group = zarr.open_group(str(path), mode="r")
            if "ALIGN" not in group:
                return None
            table = group["ALIGN"]
            values = {name: np.asarray(table[name][...]) for name in columns}
            values["ALIGN_TO"] = str(table.attrs.get("ALIGN_TO", ""))
            return values
        with fits.open(path) as hdul:
            if "ALIGN" not in hdul:
                return None
            hdu = hdul["ALIGN"]
            values = {name: np.asarray(hdu.data[name]) for name in columns}
            values["ALIGN_TO"] = str(hdu.header.get("ALIGN_TO", ""))
            return values
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CoronInputError(path, f"cannot read its ALIGN table ({error})") from None


def _read_candidates(path: Path) -> Table | None:
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


def mean_over_integrations(image: _Image) -> np.ndarray:
    """The mean over integrations of a psfsub SCI, (planes, y, x): one plane per KL cutoff
    (a single plane in jwst's layout). Read one integration at a time, NaN left out; a
    pixel without data in every integration is NaN."""
    data, kl_cube = image.data, bool(image.cutoffs)
    shape = data.shape
    if kl_cube and len(shape) != 4:
        raise ValueError(f"a KL-mode cube has 4 axes, this SCI has {len(shape)}")
    count_axis = {2: None, 3: 0, 4: 1}[len(shape)]
    planes = shape[0] if kl_cube else 1
    total = np.zeros((planes, *shape[-2:]))
    count = np.zeros_like(total)
    integrations = 1 if count_axis is None else shape[count_axis]
    for i in range(integrations):
        if count_axis is None:
            block = data[...][None]
        elif kl_cube:
            block = data[:, i]
        else:
            block = data[i][None]
        block = np.asarray(block, dtype=np.float64)
        finite = np.isfinite(block)
        total += np.where(finite, block, 0.0)
        count += finite
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


# --- drawing helpers --------------------------------------------------------------------


def symmetric_limit(values: np.ndarray, percentile: float = ROBUST_PERCENTILE) -> float:
    """Colour limit of a zero-centred map: the ``percentile`` of |finite values| (1.0 where
    there is nothing but zeros or no data, so that a colour bar can still be drawn)."""
    finite = np.abs(np.asarray(values, dtype=np.float64))
    finite = finite[np.isfinite(finite)]
    limit = float(np.percentile(finite, percentile)) if finite.size else 0.0
    return limit if limit > 0 else 1.0


def nice_length(target: float) -> float:
    """The largest of 1, 2, 5 × 10ⁿ not above ``target`` (a scale bar's length)."""
    if not target > 0:
        raise ValueError(f"a length must be > 0, got {target}")
    decade = 10.0 ** math.floor(math.log10(target))
    return max(step * decade for step in (1, 2, 5) if step * decade <= target * (1 + 1e-9))


def asinh_ticks(limit: float, linear: float, count: int = 3) -> list[float]:
    """Colour-bar ticks of an asinh stretch symmetric around 0: 0 and ± up to ``count``
    round values a decade apart, from ``limit`` down to no less than 3 × ``linear`` (closer
    to 0 they would overlap)."""
    top = nice_length(limit)
    steps = [top / 10**k for k in range(count) if top / 10**k >= 3 * linear] or [top]
    return sorted([0.0, *steps, *(-step for step in steps)])


def compass(wcs, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (dx, dy in pixels) pointing north and east at pixel (x, y) of a
    celestial WCS: the pixels of small steps to position angles 0° and 90° on the sky.
    Right for any rotation and parity of the grid."""
    from astropy import units as u

    from coron_dask.steps.resample import pixel_scale

    sky = wcs.celestial
    here = sky.pixel_to_world(x, y)
    step = pixel_scale(sky) * u.deg  # one pixel
    vectors = []
    for angle in (0.0, 90.0):
        there = here.directional_offset_by(angle * u.deg, step)
        tx, ty = sky.world_to_pixel(there)
        vector = np.array([float(tx) - x, float(ty) - y])
        vectors.append(vector / np.hypot(*vector))
    return vectors[0], vectors[1]


def _residual_cmap():
    import matplotlib

    return matplotlib.colormaps[RESIDUAL_CMAP].with_extremes(bad=NO_DATA)


def _pixel_axes(axes, title: str) -> None:
    axes.set_xlabel("x (pixel)")
    axes.set_ylabel("y (pixel)")
    axes.set_title(title, fontsize="medium")


def _outlined(width: float = 2.5) -> list:
    """A white outline, so that black marks read on dark and light pixels alike."""
    from matplotlib import patheffects

    return [patheffects.withStroke(linewidth=width, foreground="white")]


def _circle_candidates(axes, candidates: Table | None, cutoff: int | None) -> int:
    """Circle (radius λ/D, from the table's metadata) and label with its significance each
    candidate of ``cutoff`` (all of them in a table without kl); return how many."""
    from matplotlib.patches import Circle

    if candidates is None or len(candidates) == 0:
        return 0
    rows = candidates
    if cutoff is not None and "kl" in candidates.colnames:
        rows = candidates[np.asarray(candidates["kl"]) == cutoff]
    radius = max(float(candidates.meta.get("resolution_pixels", 3.0)), 2.0)
    for row in rows:
        x, y = float(row["x"]), float(row["y"])
        axes.add_patch(
            Circle(
                (x, y),
                radius,
                fill=False,
                edgecolor="k",
                linewidth=1.4,
                path_effects=_outlined(3.0),
                clip_on=True,
            )
        )
        axes.text(
            x + 0.8 * radius,
            y + 0.8 * radius,
            f"{float(row['significance']):.1f}σ",
            fontsize="small",
            color="k",
            path_effects=_outlined(),
            clip_on=True,
        )
    return len(rows)


def _panels(count: int, width: float = 4.3, height: float = 3.7):
    """A figure of ``count`` image panels, at most 4 a row; the axes as a flat list."""
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    figure, axes = _figure(
        figsize=(width * columns, height * rows + 0.4),
        nrows=rows,
        ncols=columns,
        squeeze=False,
        layout="constrained",
    )
    flat = list(axes.ravel())
    for spare in flat[count:]:
        spare.set_axis_off()
    return figure, flat[:count]


# --- the figures --------------------------------------------------------------------------


def psfsub_figure(path: str | Path, png: str | Path) -> Path:
    """The mean over integrations of a psfsub, one panel per KL cutoff (titled "KL n"),
    zero-centred colour map with robust limits: where KLIP left residuals, and where a
    companion stands out of them."""
    path = Path(path)
    image = _read_image(path, "SCI")
    try:
        means = mean_over_integrations(image)
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read its SCI ({error})") from None
    shape = image.data.shape
    integrations = shape[1] if image.cutoffs else (shape[0] if len(shape) == 3 else 1)
    truncate = image.primary.get("TRUNCATE")
    titles = (
        [f"KL {k}" for k in image.cutoffs]
        if image.cutoffs
        else [f"KL {truncate}" if truncate not in (None, "") else "mean"]
    )
    unit = image.header.get("BUNIT", "")
    figure, panels = _panels(len(means))
    cmap = _residual_cmap()
    for axes, plane, title in zip(panels, means, titles, strict=True):
        limit = symmetric_limit(plane)
        shown = axes.imshow(
            plane, origin="lower", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest"
        )
        _pixel_axes(axes, title)
        figure.colorbar(shown, ax=axes, shrink=0.9, label=unit or "value")
    figure.suptitle(
        f"{path.name}: mean of {integrations} integration(s) after KLIP", fontsize="medium"
    )
    return _save(figure, Path(png))


def i2d_figure(path: str | Path, candidates: Table | None, png: str | Path) -> Path:
    """The i2d (for a KL-mode cube, its largest cutoff) with an asinh stretch symmetric
    around 0 (the noise linear, bright residuals and companions compressed), a north/east
    compass and an arcsecond scale bar from its WCS, the star (TARG_RA, TARG_DEC) marked
    and the ``candidates`` of that cutoff circled with their significance."""
    from astropy.coordinates import SkyCoord
    from astropy.wcs import WCS
    from matplotlib.colors import AsinhNorm
    from matplotlib.lines import Line2D
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    from coron_dask.science.contrast import pixel_scale_arcsec

    path = Path(path)
    image = _read_image(path, "SCI")
    cutoffs = image.cutoffs
    try:
        if cutoffs:
            plane = int(np.argmax(cutoffs))
            data = np.asarray(image.data[plane], dtype=np.float64)
        else:
            data = np.asarray(image.data[...], dtype=np.float64)
        if data.ndim != 2:
            raise ValueError(f"SCI has {data.ndim} axes where an image has 2")
        grid = WCS(image.header, naxis=2)
        if not grid.has_celestial:
            raise ValueError("SCI has no celestial WCS")
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read its SCI ({error})") from None
    cutoff = max(cutoffs) if cutoffs else None
    limit = symmetric_limit(data, 99.9)
    finite = data[np.isfinite(data)]
    noise = 1.4826 * float(np.median(np.abs(finite - np.median(finite)))) if finite.size else 0
    linear = noise if 0 < noise < limit else limit / 100
    figure, axes = _figure(figsize=(6.6, 5.6), layout="constrained")
    shown = axes.imshow(
        data,
        origin="lower",
        cmap=_residual_cmap(),
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
        axes.plot(sx, sy, marker="+", markersize=14, mew=1.6, color="k", path_effects=_outlined())
        handles.append(Line2D([], [], marker="+", color="k", ls="", markersize=10, label="star"))
    if _circle_candidates(axes, candidates, cutoff):
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
            path_effects=_outlined(),
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
    _pixel_axes(axes, f"{path.name}{which}")
    return _save(figure, Path(png))


def snr_figure(path: str | Path, candidates: Table | None, png: str | Path) -> Path:
    """The detection map's significance (SIGNIF: Gaussian-equivalent σ), one panel per KL
    cutoff, zero-centred, with that cutoff's candidates circled: what stands above the
    noise, and how the noise looks around it."""
    path = Path(path)
    image = _read_image(path, "SIGNIF")
    try:
        data = np.asarray(image.data[...], dtype=np.float64)
        planes = data if image.cutoffs else data[None]
        if planes.ndim != 3:
            raise ValueError(f"SIGNIF has {data.ndim} axes")
    except (OSError, ValueError) as error:
        raise CoronInputError(path, f"cannot read its SIGNIF ({error})") from None
    cutoffs = image.cutoffs or [None]
    threshold = 5.0 if candidates is None else float(candidates.meta.get("threshold_sigma", 5))
    figure, panels = _panels(len(planes), width=4.6, height=4.0)
    cmap = _residual_cmap()
    for axes, plane, cutoff in zip(panels, planes, cutoffs, strict=True):
        limit = max(symmetric_limit(plane), threshold)
        shown = axes.imshow(
            plane, origin="lower", cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest"
        )
        found = _circle_candidates(axes, candidates, cutoff)
        title = f"KL {cutoff}" if cutoff is not None else "significance"
        _pixel_axes(axes, f"{title}: {found} candidate(s) > {threshold:g}σ")
        figure.colorbar(shown, ax=axes, shrink=0.9, label="significance (σ)")
    figure.suptitle(f"{path.name}: detection map", fontsize="medium")
    return _save(figure, Path(png))


def shifts_figure(alignment: dict, exposure: str, png: str | Path) -> Path:
    """The alignment fits against science integration: DX and DY (pixels; the reference's
    offset from the science frame), one thin line per reference and their mean thick, and
    BETA (reference flux / science flux) below. Drifts, jumps and odd references show."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    integration = np.asarray(alignment["INTEGRATION"], dtype=int)
    psf = np.asarray(alignment["PSF"], dtype=int)
    steps, rows = np.unique(integration, return_inverse=True)
    references, columns = np.unique(psf, return_inverse=True)
    figure, panels = _figure(figsize=(7.0, 7.2), nrows=3, sharex=True, layout="constrained")
    marker = "o" if len(steps) < 12 else None
    for axes, name, label in zip(
        panels,
        ("DX", "DY", "BETA"),
        ("DX (pixel)", "DY (pixel)", "BETA (flux ratio)"),
        strict=True,
    ):
        values = np.full((len(steps), len(references)), np.nan)
        values[rows, columns] = np.asarray(alignment[name], dtype=np.float64)
        axes.plot(steps, values, color="C0", lw=0.7, alpha=0.45, marker=marker, markersize=2.5)
        axes.plot(steps, np.nanmean(values, axis=1), color="k", lw=2.4, marker=marker)
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    panels[-1].set_xlabel("science integration")
    panels[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    panels[-1].set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
    figure.legend(
        handles=[
            Line2D([], [], color="C0", lw=0.7, label=f"each reference ({len(references)})"),
            Line2D([], [], color="k", lw=2.4, label="mean"),
        ],
        fontsize="small",
        loc="outside lower center",
        ncols=2,
    )
    aligned = {"first": "its first integration"}.get(
        alignment.get("ALIGN_TO"), "each science integration"
    )
    figure.suptitle(
        f"{exposure}: alignment fits of the references, aligned to {aligned}",
        fontsize="medium",
    )
    return _save(figure, Path(png))


# --- the products of a folder -------------------------------------------------------------


def _kind(path: Path) -> tuple[str, str] | None:
    """(kind, stem) of a product's name, or None for anything else."""
    stem = path.name.removesuffix(path.suffix)
    for kind in KINDS:
        if not stem.endswith(f"_{kind}"):
            continue
        if kind == "contrast" and path.suffix == ".ecsv":
            return kind, stem
        if kind != "contrast" and path.suffix in (".fits", ".zarr"):
            return kind, stem
    return None


def products(outdir: Path) -> dict[str, dict[str, Path]]:
    """The products in ``outdir`` by kind and stem; a product written both as FITS and as
    Zarr is taken from its FITS file."""
    found: dict[str, dict[str, Path]] = {kind: {} for kind in KINDS}
    for path in sorted(outdir.iterdir(), key=lambda p: (p.suffix != ".fits", p.name)):
        recognised = _kind(path)
        if recognised is not None:
            found[recognised[0]].setdefault(recognised[1], path)
    return found


def quicklook(outdir: str | Path, folder: str | Path | None = None) -> list[Path]:
    """Write the quicklook PNGs of the products in ``outdir`` (a run's output folder) into
    ``folder`` (default: ``outdir``) and return their paths: each psfsub's mean, the i2d,
    the detection map, the contrast curve (where there is one) and each science exposure's
    alignment fits (see the module's docstring).

    Raises CoronInputError (one line naming the folder or file) when ``outdir`` is not a
    folder, holds no product, or a product cannot be read."""
    outdir = Path(outdir)
    if not outdir.exists():
        raise CoronInputError(outdir, "no such folder")
    if not outdir.is_dir():
        raise CoronInputError(outdir, "not a folder: give the folder of a run's products")
    found = products(outdir)
    if not any(found.values()):
        raise CoronInputError(
            outdir,
            "no coron-dask product here (*_psfsub, *_psfalign, *_i2d, *_snr .fits or .zarr, "
            "*_contrast.ecsv)",
        )
    folder = outdir if folder is None else Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CoronInputError(folder, "not a folder: the PNGs go into a folder")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, path in found["psfsub"].items():
        written.append(psfsub_figure(path, folder / f"{stem}_mean.png"))
    for stem, path in found["i2d"].items():
        candidates = _read_candidates(outdir / f"{stem.removesuffix('_i2d')}_candidates.ecsv")
        written.append(i2d_figure(path, candidates, folder / f"{stem}.png"))
    for stem, path in found["snr"].items():
        candidates = _read_candidates(outdir / f"{stem.removesuffix('_snr')}_candidates.ecsv")
        written.append(snr_figure(path, candidates, folder / f"{stem}.png"))
    for stem, path in found["contrast"].items():
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
        written.append(contrast_figure(table, folder / f"{stem}.png"))
    exposures: dict[str, list[Path]] = {}
    for kind in ("psfsub", "psfalign"):  # the same record in both: psfsub's, if there
        for stem, path in found[kind].items():
            exposures.setdefault(stem.removesuffix(f"_{kind}"), []).append(path)
    for exposure, paths in exposures.items():
        alignment = next(filter(None, map(_read_alignment, paths)), None)
        if alignment is None or len(alignment["INTEGRATION"]) == 0:
            log.warning("quicklook: %s has no ALIGN table: no shifts figure", paths[0].name)
            continue
        written.append(shifts_figure(alignment, exposure, folder / f"{exposure}_shifts.png"))
    return written
