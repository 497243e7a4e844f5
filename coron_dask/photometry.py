"""Signal-to-noise of a point source in a PSF-subtracted image (Mawet et al. 2014).

The noise is measured in apertures of the same size at the same separation from the star,
with the small-sample correction of Student's t: what astronomers report for a detection.
"""

import numpy as np


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


def _read(path, name: str) -> tuple[np.ndarray, dict]:
    """An extension's data and keywords, from a FITS product or a Zarr store."""
    if str(path).endswith(".zarr"):
        import zarr

        array = zarr.open_group(str(path), mode="r")[name]
        return np.asarray(array), dict(array.attrs)
    from astropy.io import fits

    with fits.open(path) as hdul:
        return hdul[name].data, dict(hdul[name].header)


def companion_figures(products: list, truth: dict) -> dict:
    """The injected companion measured in the products of a simulated observation.

    Per science exposure (one roll each): its S/N in the mean psfsub image at its true
    detector place. In the i2d (if any): where it is found against its true sky position
    (pixels) and its S/N there.
    """
    from astropy.wcs import WCS

    figures: dict = {"rolls": []}
    for name, positions in truth["companion"].items():
        root = name.removesuffix("_calints.fits")
        psfsub = next(p for p in products if p.name.startswith(root) and "_psfsub" in p.name)
        image = _read(psfsub, "SCI")[0].mean(axis=0)
        place = tuple(np.mean(positions, axis=0))
        offsets = np.mean(truth["frames"][name]["star_offset"], axis=0)
        star = tuple(np.array(image.shape[::-1]) / 2 + offsets)
        figures["rolls"].append(companion_snr(image, peak_position(image, place), star))
    i2d = next((p for p in products if "_i2d" in p.name), None)
    if i2d is not None:
        data, header = _read(i2d, "SCI")
        image = np.nan_to_num(data.astype(np.float64))
        grid = WCS(header, naxis=2)
        place = tuple(float(v) for v in grid.world_to_pixel_values(*truth["companion_sky"]))
        star = tuple(float(v) for v in grid.world_to_pixel_values(*truth["star_sky"]))
        found = peak_position(image, place)
        figures["i2d_offset"] = float(np.hypot(found[0] - place[0], found[1] - place[1]))
        figures["i2d_snr"] = companion_snr(image, found, star)
        figures["i2d_place"] = found
    return figures
