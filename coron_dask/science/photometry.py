"""Detection statistics of PSF-subtracted images (Mawet et al. 2014, ApJ 792, 97).

The noise of speckle-dominated images is measured over the independent resolution elements
at a separation from the star, with Student's t for their small number: what astronomers
report for a detection, and what the contrast curve and the detection map share.

Conventions. An image is a 2-D array, NaN where there is no data. The star is at (x, y) in
pixels, 0-based, pixel centres at integers; r is the distance of a pixel's centre to the star.
w is the resolution element (λ/D) in pixels and h = w/2.

``noise_profile`` (the contrast curve): at each separation s, the finite pixels of the annulus
s − h < r < s + h give the mean μ(s) and standard deviation σ(s) (ddof=1); the annulus holds
n(s) = floor(2πs/w) independent resolution elements, and the detection threshold at the
significance k (5 by default) is

    τ(s) = μ + t.ppf(1 − FPF, n − 1) · σ · sqrt(1 + 1/n),    FPF = norm.sf(k),

the flux of a single element that is as unlikely under the noise as a kσ Gaussian event
(FPF ≈ 2.87e-7 for k = 5; t.ppf(1 − FPF) is evaluated as t.isf(FPF), which keeps its
digits). n counts the elements of the whole circle, NaN pixels or not (pyKLIP's
meas_contrast instead divides the annulus' finite pixels by π h², ~27 % more elements without
NaNs, fewer where NaNs thin the annulus: thresholds differ by ~15 % at some separations within
5 w, ~30 % at the edge of a mask; by less than 10 % beyond 5 w and 2 % beyond 25 w).
NaN where n < 2 or the annulus has fewer than 2 finite pixels.

``snr_map`` (the detection map): each pixel, of value v at r_p, is tested against its own
annulus r_p − h < r < r_p + h without the pixels whose centres lie less than w from its own
(its resolution element and the ones overlapping it): with μ, σ (ddof=1) of those and
n2 = floor(2πr_p/w) − 1 the elements left, the two-sample t statistic is

    S/N = (v − μ) / (σ · sqrt(1 + 1/n2)),

and its Gaussian-equivalent significance norm.isf(t.sf(S/N, n2 − 1)): the k of a Gaussian
event as improbable as that S/N under Student's t. NaN where there is no data, n2 < 2 or fewer
than 2 annulus pixels. Where t.sf underflows (significance beyond ~38) the leading term of its
tail expansion keeps the significance finite and increasing.

``find_candidates``: the local maxima of the significance map (the highest pixel within w)
above a threshold, placed to sub-pixel on the S/N map, with separations, position angles
(degrees east of north, from the sky coordinates of star and candidate: only with a WCS, NaN
without) and the detector angle (from +y towards −x: the PA if north were up, east left).

``companion_snr``: the aperture form used by the demo: the S/N of a source at a given place
against apertures of the same size on its ring (the same t statistic over aperture sums).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage, special  # not scipy.stats: its import costs a run 0.9 s

from coron_dask.io import open_product


def aperture_sum(image: np.ndarray, x: float, y: float, radius: float) -> float:
    """Sum of the finite pixels whose centres lie within ``radius`` of (x, y)."""
    yy, xx = np.indices(image.shape)
    inside = (np.hypot(xx - x, yy - y) <= radius) & np.isfinite(image)
    return float(image[inside].sum())


def companion_snr(
    image: np.ndarray, position: tuple[float, float], star: tuple[float, float], radius: float = 1.5
) -> float:
    """S/N of the source at ``position`` (x, y) against apertures on its ring around ``star``."""
    dx, dy = position[0] - star[0], position[1] - star[1]
    separation = np.hypot(dx, dy)
    angle = np.arctan2(dy, dx)
    count = int(np.floor(2 * np.pi * separation / (2 * radius)))
    # skip the companion's own aperture and its two neighbours, which its wings may touch
    angles = angle + 2 * np.pi * np.arange(2, count - 1) / count
    background = np.array(
        [
            aperture_sum(
                image, star[0] + separation * np.cos(a), star[1] + separation * np.sin(a), radius
            )
            for a in angles
        ]
    )
    signal = aperture_sum(image, *position, radius) - background.mean()
    noise = background.std(ddof=1) * np.sqrt(1 + 1 / len(background))
    return float(signal / noise)


def peak_position(
    image: np.ndarray, near: tuple[float, float], search: float = 3.0
) -> tuple[float, float]:
    """Centroid (x, y) of the brightest pixel's 3×3 box within ``search`` pixels of ``near``."""
    yy, xx = np.indices(image.shape)
    region = np.hypot(xx - near[0], yy - near[1]) <= search
    masked = np.where(region & np.isfinite(image), image, -np.inf)
    iy, ix = np.unravel_index(np.argmax(masked), image.shape)
    box = np.clip(image[iy - 1 : iy + 2, ix - 1 : ix + 2], 0, None)
    by, bx = np.indices(box.shape)
    total = box.sum()
    return float(ix - 1 + (bx * box).sum() / total), float(iy - 1 + (by * box).sum() / total)


def _read(path: Path, name: str) -> tuple[np.ndarray, dict]:
    """An extension's data (as stored) and keywords, from a product (FITS or Zarr)."""
    array = open_product(path)[name]
    return np.asarray(array.data.compute(scheduler="synchronous")), array.attrs


def kl_planes(products: list) -> list[int | None]:
    """The KL cutoffs of a run's psfsub and i2d planes (KLMODEn of a KL-mode cube), or
    [None]: one cutoff, no kl axis (jwst's layout)."""
    psfsub = next(p for p in products if "_psfsub" in p.name)
    dataset = open_product(psfsub)
    return [int(k) for k in dataset["kl"].values] if "kl" in dataset.dims else [None]


def companion_figures(products: list, truth: dict, plane: int = 0) -> dict:
    """The injected companion measured in the products of a simulated observation.

    Per science exposure (one roll each): its S/N in the mean psfsub image at its true
    detector place. In the i2d (if any): where it is found against its true sky position
    (pixels) and its S/N there. Of a KL-mode cube, its ``plane`` (``kl_planes``' order).
    """

    def image_of(path: Path) -> tuple[np.ndarray, dict]:
        data, header = _read(path, "SCI")
        return (data[plane] if "KLMODE0" in header else data), header

    figures: dict = {"rolls": []}
    for name, positions in truth["companion"].items():
        root = name.removesuffix("_calints.fits")
        psfsub = next(p for p in products if p.name.startswith(root) and "_psfsub" in p.name)
        image = image_of(psfsub)[0].mean(axis=0)
        place = tuple(np.mean(positions, axis=0))
        offsets = np.mean(truth["frames"][name]["star_offset"], axis=0)
        star = tuple(np.array(image.shape[::-1]) / 2 + offsets)
        figures["rolls"].append(companion_snr(image, peak_position(image, place), star))
    i2d = next((p for p in products if "_i2d" in p.name), None)
    if i2d is not None:
        data, header = image_of(i2d)
        image = np.nan_to_num(data.astype(np.float64))
        grid = WCS({k: v for k, v in header.items() if not isinstance(v, list | dict)}, naxis=2)
        place = tuple(float(v) for v in grid.world_to_pixel_values(*truth["companion_sky"]))
        star = tuple(float(v) for v in grid.world_to_pixel_values(*truth["star_sky"]))
        found = peak_position(image, place)
        figures["i2d_offset"] = float(np.hypot(found[0] - place[0], found[1] - place[1]))
        figures["i2d_snr"] = companion_snr(image, found, star)
        figures["i2d_place"] = found
    return figures


def _separations(shape: tuple[int, ...], star: tuple[float, float]) -> np.ndarray:
    """Distance of every pixel centre to the star (x, y)."""
    yy, xx = np.indices(shape, dtype=np.float64)
    return np.hypot(xx - star[0], yy - star[1])


def _fpf(significance: float) -> float:
    """False-positive fraction of a one-sided Gaussian event of ``significance`` σ."""
    return float(special.ndtr(-significance))  # norm.sf


@dataclass(frozen=True)
class NoiseProfile:
    """The noise of an image against separation (arrays of one length; see the module text).

    ``separation`` in pixels; ``mean`` μ and ``std`` σ of the annulus pixels; ``npix`` its finite
    pixels; ``n`` floor(2πs/w) resolution elements; ``threshold`` τ, the ``significance``-σ
    equivalent detection threshold, in the image's units.
    """

    separation: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    npix: np.ndarray
    n: np.ndarray
    threshold: np.ndarray
    significance: float = 5.0


def noise_profile(
    image: np.ndarray,
    star: tuple[float, float],
    resolution: float,
    separations,
    significance: float = 5.0,
) -> NoiseProfile:
    """The annulus noise and small-sample detection threshold at each separation (pixels).

    What a contrast curve is made of: τ(s) = μ + t.ppf(1 − FPF, n − 1) σ sqrt(1 + 1/n), with
    n = floor(2πs/w) and FPF = norm.sf(``significance``).
    """
    image = np.asarray(image, dtype=np.float64)
    seps = np.atleast_1d(np.asarray(separations, dtype=np.float64))
    half = resolution / 2
    r = _separations(image.shape, star)
    good = np.isfinite(image)
    order = np.argsort(r[good], kind="stable")
    radii, values = r[good][order], image[good][order]
    # s − h < r < s + h: the pixels strictly inside, as slices of the sorted arrays
    lo = np.searchsorted(radii, seps - half, side="right")
    hi = np.searchsorted(radii, seps + half, side="left")
    npix = hi - lo
    mean = np.full(seps.shape, np.nan)
    std = np.full(seps.shape, np.nan)
    for i in np.flatnonzero(npix >= 2):
        ring = values[lo[i] : hi[i]]
        mean[i], std[i] = ring.mean(), ring.std(ddof=1)
    n = np.floor(2 * np.pi * seps / resolution).astype(np.int64)
    ok = (n >= 2) & (npix >= 2)
    dof = np.where(ok, n - 1, 1)
    t_isf = -special.stdtrit(dof, _fpf(significance))  # t.isf(FPF, n − 1)
    factor = t_isf * np.sqrt(1 + 1 / np.where(ok, n, 1))
    threshold = np.where(ok, mean + factor * std, np.nan)
    mean, std = np.where(ok, mean, np.nan), np.where(ok, std, np.nan)
    return NoiseProfile(seps, mean, std, npix, n, threshold, float(significance))


def gaussian_significance(tstat, dof) -> np.ndarray:
    """The σ of a Gaussian event as improbable as Student's t statistic ``tstat`` with ``dof``.

    norm.isf(t.sf(tstat, dof)), odd in ``tstat``, computed from log t.sf so that it stays exact
    to far tails; where even that underflows (beyond ~38σ) the leading term of the tail of the
    incomplete beta function takes over, so huge S/N give large finite significances.
    """
    tstat = np.asarray(tstat, dtype=np.float64)
    dof = np.asarray(dof, dtype=np.float64)
    x = np.abs(tstat)
    with np.errstate(divide="ignore", invalid="ignore"):
        logsf = np.log(special.stdtr(dof, -x))  # t.logsf, as scipy.stats computes it
        # t.sf(x, ν) = I_z(ν/2, 1/2) / 2 with z = ν/(ν + x²) → z^a (1 − z)^b / (2 a B(a, b))
        a = dof / 2
        z = dof / (dof + x * x)
        tail = np.log(0.5) + a * np.log(z) + 0.5 * np.log1p(-z) - np.log(a) - special.betaln(a, 0.5)
        logsf = np.where(np.isneginf(logsf), tail, logsf)
        return np.sign(tstat) * -special.ndtri_exp(logsf)


def _pad(array: np.ndarray, width: int) -> np.ndarray:
    return np.pad(array, width, mode="constant", constant_values=np.nan)


def snr_map(
    image: np.ndarray, star: tuple[float, float], resolution: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel S/N (two-sample t) against its annulus and its Gaussian-equivalent significance.

    Returns (snr, significance), images of ``image``'s shape. The annulus sums of every pixel
    come from prefix sums over the pixels sorted by separation (exact membership, no binning);
    its own neighbourhood (centres closer than w) is taken out with one array operation per
    offset of that small stencil: no loop over pixels, ~1 s for 1000 × 1000.
    """
    image = np.asarray(image, dtype=np.float64)
    good = np.isfinite(image)
    # a global offset would only cost precision in the one-pass variance
    values = image - (np.median(image[good]) if good.any() else 0.0)
    r = _separations(image.shape, star)
    half = resolution / 2
    below, above = r - half, r + half  # the annulus is below < r_q < above, for every test

    order = np.argsort(r[good], kind="stable")
    radii, v = r[good][order], values[good][order]
    lo = np.searchsorted(radii, below, side="right")
    hi = np.searchsorted(radii, above, side="left")
    count = (hi - lo).astype(np.float64)
    s1 = np.zeros(image.shape)
    s2 = np.zeros(image.shape)
    # difference the prefix sums from whichever end has less in it (the bright centre, or
    # the many outer pixels): their rounding error scales with what they hold
    for power, total in ((1, s1), (2, s2)):
        term = v**power
        head = np.concatenate([[0.0], np.cumsum(term)])
        tail = np.concatenate([np.cumsum(term[::-1])[::-1], [0.0]])
        scale = np.concatenate([[0.0], np.cumsum(np.abs(term))])
        inner = scale[hi] <= scale[-1] - scale[lo]
        total[...] = np.where(inner, head[hi] - head[lo], tail[lo] - tail[hi])

    # the pixel's own resolution element: neighbours closer than w, if in the annulus
    reach = int(np.ceil(resolution))
    padded_v = _pad(np.where(good, values, np.nan), reach)
    padded_r = _pad(r, reach)
    ny, nx = image.shape
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dx * dx + dy * dy >= resolution * resolution:
                continue
            nv = padded_v[reach + dy : reach + dy + ny, reach + dx : reach + dx + nx]
            nr = padded_r[reach + dy : reach + dy + ny, reach + dx : reach + dx + nx]
            with np.errstate(invalid="ignore"):
                inside = np.isfinite(nv) & (nr > below) & (nr < above)
            count -= inside
            s1 -= np.where(inside, nv, 0.0)
            s2 -= np.where(inside, nv * nv, 0.0)

    n2 = np.floor(2 * np.pi * r / resolution) - 1
    ok = good & (n2 >= 2) & (count >= 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / count
        var = np.clip((s2 - s1 * mean) / (count - 1), 0.0, None)
        snr = (values - mean) / np.sqrt(var * (1 + 1 / n2))
    ok &= np.isfinite(snr)
    snr = np.where(ok, snr, np.nan)
    significance = np.full(image.shape, np.nan)
    significance[ok] = gaussian_significance(snr[ok], n2[ok] - 1)
    return snr, significance


def _refine(image: np.ndarray, iy: int, ix: int) -> tuple[float, float]:
    """Sub-pixel peak (x, y): a parabola through the peak and its two neighbours on each axis."""
    place = []
    for axis, (i, size) in enumerate(((ix, image.shape[1]), (iy, image.shape[0]))):
        if 0 < i < size - 1:
            if axis == 0:
                left, mid, right = image[iy, ix - 1 : ix + 2]
            else:
                left, mid, right = image[iy - 1 : iy + 2, ix]
            curve = left - 2 * mid + right
            shift = 0.5 * (left - right) / curve if np.isfinite(curve) and curve < 0 else 0.0
            place.append(i + float(np.clip(shift, -0.5, 0.5)))
        else:
            place.append(float(i))
    return place[0], place[1]


def find_candidates(
    significance: np.ndarray,
    snr: np.ndarray,
    threshold: float = 5.0,
    *,
    resolution: float,
    star: tuple[float, float],
    wcs=None,
):
    """Point-source candidates: the highest pixels within w of the significance map above
    ``threshold``, at least w inside the data (away from the image's edges and from pixels
    without data), as an astropy Table sorted by significance, most significant first.

    Columns (the same with or without ``wcs``): ``x``, ``y`` (pix; the S/N map's peak refined
    to sub-pixel by a parabola on each axis), ``separation`` (pix), ``separation_arcsec``,
    ``pa`` (deg east of north, from the sky coordinates of star and candidate through the
    celestial ``wcs``: astropy.wcs.WCS), ``ra``, ``dec`` (deg, ICRS) - those four NaN without a
    WCS -, ``pa_detector`` (deg, from +y towards −x: the PA were north up and east left),
    ``snr`` and ``significance`` at the peak pixel.
    """
    sig = np.where(np.isfinite(significance), significance, -np.inf)
    reach = int(np.floor(resolution))
    oy, ox = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    footprint = ox * ox + oy * oy <= resolution * resolution
    highest = ndimage.maximum_filter(sig, footprint=footprint, mode="constant", cval=-np.inf)
    # within w of the data's edge a pixel is partly covered (drizzle's edges, a mask):
    # its noise is not its annulus', so no candidate is taken there
    interior = ndimage.binary_erosion(np.isfinite(significance), footprint, border_value=0)
    iy, ix = np.nonzero((sig == highest) & (sig > threshold) & interior)
    # ties (a flat top) give several maxima: keep the first of each group within w
    rank = np.lexsort((ix, iy, -sig[iy, ix]))
    kept: list[tuple[int, int]] = []
    for k in rank:
        if all((iy[k] - y) ** 2 + (ix[k] - x) ** 2 > resolution**2 for y, x in kept):
            kept.append((int(iy[k]), int(ix[k])))

    snr_img = np.asarray(snr, dtype=np.float64)
    places = np.array([_refine(snr_img, y, x) for y, x in kept], dtype=np.float64).reshape(-1, 2)
    x, y = places[:, 0], places[:, 1]
    dx, dy = x - star[0], y - star[1]
    nan = np.full(len(kept), np.nan)
    ra, dec, sep_arcsec, pa = nan, nan.copy(), nan.copy(), nan.copy()
    if wcs is not None and len(kept):
        sky = wcs.celestial
        origin = sky.pixel_to_world(star[0], star[1])
        found = sky.pixel_to_world(x, y)
        sep_arcsec = origin.separation(found).to_value(u.arcsec)
        pa = origin.position_angle(found).to_value(u.deg) % 360
        ra, dec = found.icrs.ra.deg, found.icrs.dec.deg
    rows = tuple(np.array(kept, dtype=np.intp).reshape(-1, 2).T)
    return Table(
        {
            "x": x * u.pix,
            "y": y * u.pix,
            "separation": np.hypot(dx, dy) * u.pix,
            "separation_arcsec": np.asarray(sep_arcsec, dtype=np.float64) * u.arcsec,
            "pa": np.asarray(pa, dtype=np.float64) * u.deg,
            "pa_detector": np.degrees(np.arctan2(-dx, dy)) % 360 * u.deg,
            "ra": np.asarray(ra, dtype=np.float64) * u.deg,
            "dec": np.asarray(dec, dtype=np.float64) * u.deg,
            "snr": snr_img[rows].astype(np.float64),
            "significance": np.asarray(significance, dtype=np.float64)[rows],
        }
    )
