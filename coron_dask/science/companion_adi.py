"""A companion's likelihood with ADI and ADI+RDI: negative injection, the bases rebuilt.

With ADI the other rolls' integrations are references and hold the companion too, so
KLIP is not linear in it and there is no fixed forward model. As VIP's NEGFC does, the
companion θ is taken out of every frame that enters the reduction (the science
integrations, and each ADI reference at its place in its own roll, moved by the shift
align_refs fitted it) and the science reduced again: the residual on the stamp is then
noise, and −½ rᵀC⁻¹r the log-likelihood. The reduction is redone exactly, bases
included, on the pixels the companion touches (``kernels.negative_injection``), from what
the run's KLIP made (``steps.negative_injection``): each step of the sampler costs a few
(references × references) eigendecompositions, not a pass over the frames.

What is kept as it was: the references each zone uses (ADI's movement depends on the
geometry alone); align_refs' shifts (fitted on the star, which the companion barely
moves); the median fill of bad pixels (as with RDI, ``science.companion_model``). A
reference choice that depends on the data (``maxnumbasis``) is refused.
"""

from dataclasses import dataclass

import numpy as np

from coron_dask.kernels.forward_model import placed_psfs
from coron_dask.kernels.negative_injection import adi_residuals
from coron_dask.science.companion_model import CompanionModel, Roll
from coron_dask.steps.negative_injection import rectangle_places


@dataclass
class AdiWindows:
    """What negative injection needs of one science exposure for one companion
    (``steps.negative_injection.adi_windows``): the pixels U (``flat`` frame indices, their
    zone ``labels`` as indices into the zone axes, −1 none; the ``rectangles`` (y0, y1,
    x0, x1) they come from; the frame's width ``frame_x``), ``centred`` (b, p, u),
    ``target`` (b, u), ``gram`` (b, Z, p, p), ``overlaps`` (b, Z, p), ``used`` (b, Z, p),
    ``sizes`` (Z,) the zones' pixels; ``adi`` (A,) the ADI references' rows, ``sources``
    (A,) the roll (index among the fit's rolls) each comes from, ``moves`` (b, A, 2) the
    (dx, dy) align_refs moved each by (−) to each target."""

    flat: np.ndarray
    labels: np.ndarray
    rectangles: tuple
    frame_x: int
    centred: np.ndarray
    target: np.ndarray
    gram: np.ndarray
    overlaps: np.ndarray
    used: np.ndarray
    sizes: np.ndarray
    adi: np.ndarray
    sources: np.ndarray
    moves: np.ndarray

    def __post_init__(self) -> None:
        self._where = rectangle_places(self.flat, self.rectangles, self.frame_x)

    def holding(self, place: np.ndarray, reach: float) -> int | None:
        """The first rectangle that holds every pixel within ``reach`` of ``place`` (x, y)."""
        x, y = place
        for r, (y0, y1, x0, x1) in enumerate(self.rectangles):
            if y0 <= y - reach and y + reach < y1 and x0 <= x - reach and x + reach < x1:
                return r
        return None

    def on_pixels(self, spectrum, box, places: np.ndarray, rectangle: int) -> np.ndarray:
        """Companion images (n, u) on U: the PSF (its rfft2 ``spectrum`` of ``box``)
        placed at ``places`` (n, 2) = (x, y) frame pixels, each box wholly within the
        ``rectangle`` (``holding``): 0 elsewhere."""
        y0, y1, x0, x1 = self.rectangles[rectangle]
        images = placed_psfs(spectrum, box, (y1 - y0, x1 - x0), places - (x0, y0))
        out = np.zeros((len(places), len(self.flat)))
        out[:, self._where[rectangle]] = images.reshape(len(places), -1)
        return out

    def index(self, corner: tuple[int, int], shape: tuple[int, int], pixels: np.ndarray):
        """The places in U of a window's flat ``pixels`` (window of ``shape`` at ``corner``)."""
        yy, xx = np.divmod(pixels, shape[1])
        flat = (yy + corner[0]) * self.frame_x + xx + corner[1]
        where = np.searchsorted(self.flat, flat)
        if (self.flat[np.minimum(where, len(self.flat) - 1)] != flat).any():
            raise ValueError("the stamp is not within the negative injection's pixels")
        return where


class AdiCompanionModel(CompanionModel):
    """``CompanionModel`` for ADI and ADI+RDI reductions: each roll's "model" on its stamp is
    its data minus the residual of the negative injection (``stamp_models``), so that the
    likelihood −½ rᵀC⁻¹r is the residual's. Every roll's ``Roll.adi`` is an ``AdiWindows``."""

    method = "negative injection through ADI KLIP, bases rebuilt (exact)"

    def __init__(self, rolls: list[Roll], *args, **kwargs) -> None:
        super().__init__(rolls, *args, **kwargs)
        self._check_reach()

    def _check_reach(self) -> None:
        """The rectangle of U that holds the science's companion, and that of each ADI
        reference's companion as align_refs moved it (every target's move), wherever the
        sampler may take it (within the margin of the start): none, and its light would
        be cut."""
        reach = self.psf.shape[0] // 2 + self.margin
        self.holders = []
        for k, roll in enumerate(self.rolls):
            windows: AdiWindows = roll.adi
            found = [windows.holding(self.origins[k], reach)]
            where = [self.origins[k]]
            for a, source in enumerate(windows.sources):
                moved = self.origins[source] - windows.moves[:, a]
                held = {windows.holding(place, reach) for place in moved}
                found.append(held.pop() if len(held) == 1 else None)
                where.append(moved[0])
            if None in found:
                x, y = where[found.index(None)]
                raise ValueError(
                    f"{roll.name}: a companion at ({x:.1f}, {y:.1f}) is not on the negative "
                    "injection's pixels: raise coron_dask.companions.align-slack"
                )
            self.holders.append(found)

    def _operator(self, roll: Roll, stamp: np.ndarray) -> np.ndarray:
        """The stamp's places among the negative injection's pixels U."""
        return roll.adi.index(roll.corner, roll.labels.shape, stamp)

    def residuals(self, theta: np.ndarray, k: int, pixels: np.ndarray) -> np.ndarray:
        """Roll ``k``'s integration-mean psfsub (n, s) at U's ``pixels`` once the
        companions θ (n, 3) are taken out of every frame of its reduction."""
        windows: AdiWindows = self.rolls[k].adi
        places = self.places(theta)
        dimming = self.transmissions(theta) * theta[:, 2]  # (rolls, n)
        box = self.psf.shape
        holders = self.holders[k]
        science = windows.on_pixels(self.spectrum, box, places[k], holders[0])
        science *= dimming[k][:, None]
        n, b, count = len(theta), len(windows.target), len(windows.adi)
        references = np.zeros((n, b, count, len(windows.flat)))
        for source in np.unique(windows.sources):  # one placement for a roll's references
            rows = np.flatnonzero(windows.sources == source)
            for rectangle in {holders[1 + a] for a in rows}:
                mine = rows[[holders[1 + a] == rectangle for a in rows]]
                moved = places[source][:, None, None] - windows.moves[:, mine][None]
                images = windows.on_pixels(self.spectrum, box, moved.reshape(-1, 2), rectangle)
                images = images.reshape(n, b, len(mine), -1)
                references[:, :, mine] = dimming[source][:, None, None, None] * images
        out = adi_residuals(
            windows.centred,
            windows.target,
            windows.gram,
            windows.overlaps,
            windows.used.astype(bool),
            windows.sizes,
            windows.labels,
            windows.adi,
            science,
            references,
            pixels,
            self.cutoff,
        )
        return out.mean(axis=1)

    def stamp_models(self, theta: np.ndarray) -> list[np.ndarray]:
        """Per roll, its data minus the negative injection's residual (n, pixels)."""
        return [
            data[None] - self.residuals(theta, k, where)
            for k, (data, where) in enumerate(zip(self.data, self.operators, strict=True))
        ]

    def window_model(self, theta: np.ndarray, k: int) -> np.ndarray:
        """Roll ``k``'s window (wy, wx): its data minus the negative injection's residual
        (NaN in no zone)."""
        theta = np.asarray(theta, dtype=np.float64).reshape(1, 3)
        roll = self.rolls[k]
        shape = roll.labels.shape
        inside = np.flatnonzero(roll.labels.ravel() >= 0)
        residual = self.residuals(theta, k, roll.adi.index(roll.corner, shape, inside))[0]
        y0, x0 = roll.corner
        yy, xx = np.divmod(inside, shape[1])
        data = roll.image[yy + y0, xx + x0]
        out = np.full(shape[0] * shape[1], np.nan)
        out[inside] = data - residual
        return out.reshape(shape)
