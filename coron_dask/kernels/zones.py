"""KLIP's zones: annuli about the star cut into subsections, as pyKLIP defines them.

pyKLIP (``parallelized.klip_parallelized`` and ``klip.define_annuli_bounds``) reduces each
zone with a KL basis of its own: a pixel at distance r and polar angle θ from the star
(measured from the +x axis towards +y) is in annulus i when ``edge[i] <= r < edge[i+1]``
and in subsection j when ``j·Δφ <= θ mod 2π < (j+1)·Δφ``, Δφ = 2π/M. The annuli's edges
run from the inner working angle (IWA) to the outer one (OWA), spaced:

- ``constant``: N annuli of equal width (OWA − IWA)/N;
- ``log``: widths in proportion to 1 + ln(i + 1), i = 0 … N − 1, summing to OWA − IWA;
- ``linear``: as pyKLIP 2.10 defines it, N annuli of equal width (OWA − IWA)/(N(N+1)/2)
  from the IWA (its widths were meant to grow with i; they do not, so the annuli stop at
  IWA + 2(OWA − IWA)/(N + 1)).

Without an OWA, the annuli are spaced up to the frame's pixel farthest from the star and
the last one reaches out to a radius of the frame's height (pyKLIP's "full image"; for a
star far from the frame's centre that can be nearer than its inner edge: it is empty). A
pixel in no zone (inside the IWA, beyond the OWA, or in a zone of one pixel, which pyKLIP
skips) has label −1. The arithmetic of r, θ and the edges is pyKLIP's, so that a pixel on
an edge falls on the same side.

A zone map is fixed per science exposure (the star's place on its detector); the KLIP
tasks work through it a tile of frame rows at a time (``Zones.segments``), so that each
pixel is visited once whatever the number of zones.
"""

from dataclasses import dataclass, field

import numpy as np

SPACINGS = ("constant", "linear", "log")
#: References whose pixels of a tile the KLIP tasks gather in zone order at once.
GATHER = 16
#: Frames whose zone means are summed at once (``zone_means``), as bytes of float32 frames:
#: their pixels gathered in zone order (float32), then as float64.
MEANS_BATCH = 2**20


def means_batch(pixels: int) -> int:
    """Frames of ``pixels`` pixels whose zone means ``zone_means`` sums at once."""
    return max(1, MEANS_BATCH // (4 * pixels))


def annuli_edges(annuli: int, iwa: float, owa: float, spacing: str = "constant") -> np.ndarray:
    """The annuli's edges (annuli + 1,) in pixels from the star, from ``iwa`` to ``owa``,
    spaced as pyKLIP spaces them (see the module's docstring)."""
    span = float(owa - iwa)
    if spacing == "constant":
        return np.array([span / annuli * i + iwa for i in range(annuli + 1)])
    if spacing == "linear":
        step = span / np.sum(np.arange(annuli) + 1)
        return np.array([iwa + step * i for i in range(annuli + 1)])
    if spacing == "log":
        widths = np.log(np.arange(annuli) + 1) + 1
        scale = span / np.sum(widths)
        edges = [float(iwa)]
        for width in widths:
            edges.append(edges[-1] + scale * width)
        return np.array(edges)
    raise ValueError(f"annuli_spacing must be one of {SPACINGS}, got {spacing!r}")


def polar(shape: tuple[int, int], star: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Squared distance r² and pyKLIP's angle φ = (θ mod 2π) − π, in [−π, π), of every
    pixel (y, x) of a frame of ``shape`` from the ``star`` at (x, y), 0-based pixels."""
    ny, nx = shape
    dx = np.arange(nx, dtype=np.float64)[None, :] - star[0]
    dy = np.arange(ny, dtype=np.float64)[:, None] - star[1]
    angle = np.arctan2(dy, dx) % (2 * np.pi) - np.pi
    return dx**2 + dy**2, angle


@dataclass(frozen=True, eq=False)
class Zones:
    """A zone map: ``labels`` (y, x), the zone of each pixel (annulus · subsections +
    subsection), −1 in none; the ``edges`` of the annuli (pixels from the ``star``, (x, y))
    and how many ``subsections`` each has. ``order`` and ``starts``: the pixels in zones
    (flat indices) sorted by zone, and where each zone's run begins (count + 1)."""

    labels: np.ndarray
    edges: np.ndarray
    subsections: int
    star: tuple[float, float]
    order: np.ndarray = field(init=False, repr=False)
    starts: np.ndarray = field(init=False, repr=False)

    def __reduce__(self) -> tuple:
        """Pickled as made: the sorted order (8 bytes a pixel) is made again where it is
        unpickled, so a task carries the labels (2 bytes a pixel) only."""
        return type(self), (self.labels, self.edges, self.subsections, self.star)

    def __post_init__(self) -> None:
        flat = self.labels.ravel()
        inside = np.flatnonzero(flat >= 0)
        order = inside[np.argsort(flat[inside], kind="stable")]
        counts = np.bincount(flat[inside], minlength=self.count)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "starts", np.concatenate([[0], np.cumsum(counts)]))

    @property
    def annuli(self) -> int:
        return len(self.edges) - 1

    @property
    def count(self) -> int:
        """Zones: annuli × subsections."""
        return self.annuli * self.subsections

    @property
    def pixels(self) -> np.ndarray:
        """Pixels in each zone (count,)."""
        return np.diff(self.starts)

    def segments(self, pixels: slice) -> tuple[np.ndarray, list[tuple[int, slice]]]:
        """The pixels of a tile (``pixels``: a slice of the flat frame) that are in zones,
        as flat frame indices sorted by zone, and each zone's run in them: (zone, slice)."""
        labels = self.labels.ravel()[pixels]
        inside = np.flatnonzero(labels >= 0)
        order = inside[np.argsort(labels[inside], kind="stable")]
        counts = np.bincount(labels[order], minlength=self.count)
        ends = np.cumsum(counts)
        runs = [
            (z, slice(int(e - n), int(e)))
            for z, (n, e) in enumerate(zip(counts, ends, strict=True))
            if n
        ]
        return order + pixels.start, runs


def zone_map(
    shape: tuple[int, int],
    star: tuple[float, float],
    annuli: int = 1,
    subsections: int = 1,
    spacing: str = "constant",
    iwa: float = 0.0,
    owa: float | None = None,
) -> Zones:
    """The zones of a frame of ``shape`` (y, x) about the ``star`` at (x, y), 0-based
    pixels: ``annuli`` annuli from ``iwa`` to ``owa`` (pixels; None: pyKLIP's full image),
    spaced by ``spacing``, each cut into ``subsections``. Raises ValueError where an
    annulus would be narrower than a pixel (pyKLIP refuses those)."""
    squared, angle = polar(shape, star)
    radius = np.sqrt(squared)
    outer = float(np.sqrt(np.max(squared))) if owa is None else float(owa)
    edges = annuli_edges(annuli, iwa, outer, spacing)
    if np.min(np.diff(edges)) < 1:
        raise ValueError(
            f"{annuli} annuli from {iwa:g} to {outer:.1f} px are narrower than a pixel"
        )
    if owa is None:  # the last annulus takes the rest of the frame
        edges[-1] = shape[0]
    annulus = np.searchsorted(edges[:-1], radius, side="right") - 1  # its inner edge
    within = radius < edges[np.clip(annulus + 1, 0, annuli)]  # and its outer edge
    step = 2 * np.pi / subsections
    bounds = np.array([step * j - np.pi for j in range(subsections)] + [np.pi])
    sector = np.searchsorted(bounds, angle, side="right") - 1
    inside = (annulus >= 0) & within & (sector >= 0) & (sector < subsections)
    labels = np.where(inside, annulus * subsections + sector, -1)
    dtype = np.int16 if annuli * subsections < 2**15 else np.int32
    counts = np.bincount(labels[inside], minlength=annuli * subsections)
    labels[inside & (counts[np.maximum(labels, 0)] < 2)] = -1  # pyKLIP skips these
    return Zones(labels.astype(dtype), edges, subsections, (float(star[0]), float(star[1])))


def zone_means(frames: np.ndarray, zones: Zones) -> np.ndarray:
    """Mean (float64) of each frame of ``frames`` (..., y, x) over each zone's pixels:
    (..., count), NaN for a frame that holds a NaN (flagged), 0 for a zone of no pixel.
    pyKLIP subtracts these from references and science before each zone's KLIP."""
    lead = frames.shape[:-2]
    flat = frames.reshape(-1, frames.shape[-2] * frames.shape[-1])
    sizes = zones.pixels
    full = sizes > 0
    out = np.zeros((len(flat), zones.count))
    batch = means_batch(flat.shape[1])
    for start in range(0, len(flat), batch):
        part = np.take(flat[start : start + batch], zones.order, axis=1).astype(np.float64)
        sums = np.add.reduceat(part, zones.starts[:-1][full], axis=1)
        out[start : start + batch, full] = sums / sizes[full]
    return out.reshape(*lead, zones.count)


def describe(zones: Zones) -> str:
    """The zones in words, for the log."""
    edges = ", ".join(f"{edge:.1f}" for edge in zones.edges)
    outside = int(np.count_nonzero(zones.labels < 0))
    return (
        f"{zones.count} zone(s): {zones.annuli} annuli × {zones.subsections} subsection(s) "
        f"about the star at (x, y) = ({zones.star[0]:.2f}, {zones.star[1]:.2f}) px, annuli "
        f"edges {edges} px; {outside} pixel(s) in no zone (NaN in psfsub); pixels per zone "
        f"{int(zones.pixels.min())} to {int(zones.pixels.max())}"
    )
