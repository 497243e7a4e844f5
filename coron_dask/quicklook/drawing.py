"""Drawing helpers of the quicklook figures: matplotlib ``Figure`` objects drawn by the
Agg renderer, never pyplot's global state (a notebook's backend is left alone); each PNG
written to a partial file and renamed, so that it appears whole or not at all."""

import math
from pathlib import Path

import matplotlib
import numpy as np
from astropy.table import Table
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

#: Diverging colour map for residuals and significance: white at zero; no data in grey.
RESIDUAL_CMAP = "RdBu_r"
NO_DATA = "0.75"
#: Percentile of |value| that sets the colour limits of residual images.
ROBUST_PERCENTILE = 99.5


def figure_and_axes(**options):
    """A figure and its axes (``Figure.subplots`` options), drawn off-screen by Agg."""
    layout = options.pop("layout", None)
    figure = Figure(figsize=options.pop("figsize", None), layout=layout)
    return figure, figure.subplots(**options)


def save(figure, path: Path) -> Path:
    """Write ``figure`` as PNG to a partial file and rename it onto ``path``."""
    FigureCanvasAgg(figure)
    partial = path.with_name(path.name + ".partial.png")
    try:
        figure.savefig(partial, dpi=110, bbox_inches="tight")
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


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


def residual_cmap():
    return matplotlib.colormaps[RESIDUAL_CMAP].with_extremes(bad=NO_DATA)


def pixel_axes(axes, title: str) -> None:
    axes.set_xlabel("x (pixel)")
    axes.set_ylabel("y (pixel)")
    axes.set_title(title, fontsize="medium")


def outlined(width: float = 2.5) -> list:
    """A white outline, so that black marks read on dark and light pixels alike."""
    return [patheffects.withStroke(linewidth=width, foreground="white")]


def circle_candidates(axes, candidates: Table | None, cutoff: int | None) -> int:
    """Circle (radius λ/D, from the table's metadata) and label with its significance each
    candidate of ``cutoff`` (all of them in a table without kl); return how many."""
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
                path_effects=outlined(3.0),
                clip_on=True,
            )
        )
        axes.text(
            x + 0.8 * radius,
            y + 0.8 * radius,
            f"{float(row['significance']):.1f}σ",
            fontsize="small",
            color="k",
            path_effects=outlined(),
            clip_on=True,
        )
    return len(rows)


def image_panels(count: int, width: float = 4.3, height: float = 3.7):
    """A figure of ``count`` image panels, at most 4 a row; the axes as a flat list."""
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    figure, axes = figure_and_axes(
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
