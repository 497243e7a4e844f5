"""Where things are on the sky and on the detector: the pixel scale, the resolution
element λ/D at a filter's pivot wavelength, the star's place (TARG_RA, TARG_DEC) and the
pixels of places on the sky. The contrast curve, the detection map and the quicklook
figures share them.

The celestial WCS of an exposure and the side of its pixels are resample's
(``steps.resample.sky_wcs``, ``pixel_scale``), which drizzles with them; they are
re-exported here so that science and figures ask one module.
"""

import math
from collections.abc import Mapping

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.wcs import WCS

from coron_dask.core.errors import CoronInputError
from coron_dask.steps.resample import pixel_scale, sky_wcs

__all__ = [
    "DIAMETER_M",
    "PIVOT_UM",
    "compass",
    "lambda_over_d",
    "pixel_positions",
    "pixel_scale",
    "pixel_scale_arcsec",
    "sky_positions",
    "sky_wcs",
    "star_position",
]

#: Pivot wavelengths (µm) of the filters JWST's coronagraphs are used with (JDox).
PIVOT_UM = {
    "F182M": 1.839,
    "F187N": 1.874,
    "F200W": 1.990,
    "F210M": 2.093,
    "F212N": 2.120,
    "F250M": 2.503,
    "F277W": 2.786,
    "F300M": 2.996,
    "F322W2": 3.247,
    "F335M": 3.362,
    "F356W": 3.563,
    "F360M": 3.624,
    "F410M": 4.082,
    "F430M": 4.281,
    "F444W": 4.421,
    "F460M": 4.630,
    "F480M": 4.818,
    "F1065C": 10.575,
    "F1140C": 11.303,
    "F1550C": 15.514,
    "F2300C": 22.75,
}
#: JWST's diameter for λ/D (m).
DIAMETER_M = 6.5


def lambda_over_d(filter_name: str, pixel_scale_deg: float) -> float:
    """λ/D in pixels of ``pixel_scale_deg`` at the pivot wavelength of ``filter_name``."""
    pivot = PIVOT_UM.get(str(filter_name).upper())
    if pivot is None:
        raise CoronInputError(
            "FILTER",
            f"{filter_name!r} has no pivot wavelength in coron-dask's table: give the "
            "resolution element in pixels (--resolution)",
        )
    return math.degrees(pivot * 1e-6 / DIAMETER_M) / pixel_scale_deg


def pixel_scale_arcsec(wcs: WCS) -> float:
    """The pixel side of a celestial WCS, arcsec."""
    return pixel_scale(wcs.celestial) * 3600


def star_position(keywords: Mapping, source: object) -> SkyCoord:
    """The star's place on the sky: TARG_RA, TARG_DEC of the primary ``keywords`` of
    ``source`` (a science exposure, a product)."""
    try:
        return SkyCoord(float(keywords["TARG_RA"]), float(keywords["TARG_DEC"]), unit="deg")
    except KeyError:
        raise CoronInputError(
            source, "no TARG_RA/TARG_DEC in the primary header: the star's place is needed"
        ) from None


def sky_positions(star: SkyCoord, offsets: list) -> SkyCoord:
    """The places on the sky of ``offsets`` from the star: objects with a ``separation``
    (arcsec) and a ``position_angle`` (degrees east of north), such as companions."""
    angles = np.array([o.position_angle for o in offsets]) * u.deg
    separations = np.array([o.separation for o in offsets]) * u.arcsec
    return star.directional_offset_by(angles, separations)


def pixel_positions(wcs: WCS, places: SkyCoord) -> np.ndarray:
    """(n, 2) = (x, y) 0-based pixels of ``places`` on ``wcs``."""
    ra, dec = np.atleast_1d(places.ra.deg), np.atleast_1d(places.dec.deg)
    return np.column_stack(wcs.world_to_pixel_values(ra, dec))


def compass(wcs: WCS, x: float, y: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (dx, dy in pixels) pointing north and east at pixel (x, y) of a
    celestial WCS: the pixels of small steps to position angles 0° and 90° on the sky.
    Right for any rotation and parity of the grid."""
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
