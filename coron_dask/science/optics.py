"""The simulated instruments and their optics (``science.simulate``): a circular,
centrally obscured pupil with a static aberration that drifts slowly in time, a
focal-plane mask (NIRCam: a Gaussian occulting spot, sampled at λ/D = 2 pixels; MIRI: a
four-quadrant phase mask, λ/D = 3.3 pixels at F1140C, on the 224 × 288 MASK1140 subarray
whose columns beyond the coronagraph's field are NON_SCIENCE) and a Lyot stop, imaged by
Fourier optics."""

import math
from dataclasses import dataclass

import numpy as np

WAVELENGTH_NM = 3350.0  # the wavelength the aberration screens (nm rms) are phases at
PIXEL_SCALE = 0.063 / 3600  # degrees: NIRCam long wavelength
#: σ (λ/D) of the NIRCam-like round occulter's amplitude 1 − exp(−r²/2σ²): its intensity
#: transmission reaches ½ at 6.3 λ/D, as MASK335R's inner working angle.
OCCULTER_SIGMA = 4.0


def occulter_amplitude(r2: np.ndarray, sigma: float = OCCULTER_SIGMA) -> np.ndarray:
    """The round occulter's amplitude transmission at squared radii ``r2`` (in (λ/D)²)."""
    return 1 - np.exp(-r2 / (2 * sigma**2))


def occulter_sigma(iwa: float) -> float:
    """σ (λ/D) of the round occulter whose intensity transmission is ½ at ``iwa`` λ/D."""
    return iwa / math.sqrt(2 * math.log(1 / (1 - 2**-0.5)))


@dataclass(frozen=True)
class Instrument:
    """What differs between the simulated instruments."""

    name: str
    shape: tuple[int, int]  # frame (ny, nx)
    centre: tuple[int, int]  # the coronagraph's centre on the detector, 0-based (x, y)
    lambda_d: float  # pixels per λ/D
    four_quadrant: bool
    pixel_scale: float  # degrees
    field: tuple[int, int, int, int] | None  # science field (y0, y1, x0, x1); beyond: NON_SCIENCE
    keywords: dict


def nircam(size: int) -> Instrument:
    return Instrument(
        "nircam",
        (size, size),
        (size // 2, size // 2),
        2.0,
        False,
        PIXEL_SCALE,
        None,
        {
            "INSTRUME": "NIRCAM",
            "DETECTOR": "NRCALONG",
            "MODULE": "A",
            "CHANNEL": "LONG",
            "FILTER": "F410M",
            "PUPIL": "MASKRND",
            "CORONMSK": "MASKA335R",
            "SUBARRAY": "SUB320A335R" if size == 320 else "GENERIC",
            "EXP_TYPE": "NRC_CORON",
            "READPATT": "MEDIUM2",
        },
    )


#: MIRI's 4QPM subarray (MASK1140): the coronagraph's field and centre as in its PSFMASK.
MIRI = Instrument(
    "miri",
    (224, 288),
    (120, 112),
    3.3,
    True,
    0.11 / 3600,
    (8, 216, 16, 212),
    {
        "INSTRUME": "MIRI",
        "DETECTOR": "MIRIMAGE",
        "FILTER": "F1140C",
        "CORONMSK": "4QPM_1140",
        "SUBARRAY": "MASK1140",
        "EXP_TYPE": "MIR_4QPM",
        "READPATT": "FASTR1",
    },
)


@dataclass(frozen=True)
class Optics:
    """Pupil, focal-plane mask, Lyot stop and aberration modes on an FFT grid at least
    twice the frame's larger side."""

    instrument: Instrument
    pupil: np.ndarray
    lyot: np.ndarray
    mask: np.ndarray
    static: np.ndarray
    drift: np.ndarray
    reference_drift: np.ndarray
    sigma: float = OCCULTER_SIGMA  # the round occulter's (λ/D)

    @property
    def grid(self) -> int:
        return self.pupil.shape[0]

    @classmethod
    def make(
        cls, instrument: Instrument, rng: np.random.Generator, sigma: float = OCCULTER_SIGMA
    ) -> "Optics":
        """The optics of ``instrument``, a round occulter of ``sigma`` λ/D for NIRCam."""
        n = 2 * max(instrument.shape)
        radius = n / (2 * instrument.lambda_d)  # pupil radius in samples
        y, x = (np.mgrid[:n, :n] - n / 2) / radius
        r = np.hypot(x, y)
        pupil = ((r <= 1) & (r >= 0.12)).astype(float)
        lyot = ((r <= 0.85) & (r >= 0.25)).astype(float)
        fy, fx = (np.mgrid[:n, :n] - n / 2) / instrument.lambda_d  # focal plane in λ/D
        if instrument.four_quadrant:  # phase π in two opposite quadrants
            mask = np.where((fx >= 0) == (fy >= 0), 1.0, -1.0)
        else:
            mask = occulter_amplitude(fx**2 + fy**2, sigma)

        def screen(rms_nm: float) -> np.ndarray:
            k = np.hypot(*np.meshgrid(np.fft.fftfreq(n), np.fft.fftfreq(n)))
            amplitude = np.where(k > 0, 1 / np.maximum(k, 1e-9) ** 1.5, 0)
            noise = rng.normal(size=(n, n)) + 1j * rng.normal(size=(n, n))
            phase = np.fft.ifft2(noise * amplitude).real * pupil
            phase *= rms_nm / phase[pupil > 0].std()
            return 2 * np.pi * phase / WAVELENGTH_NM

        return cls(instrument, pupil, lyot, mask, screen(60.0), screen(2.0), screen(6.0), sigma)

    def transmission(self, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
        """The round occulter's intensity transmission at detector offsets (pixels) from
        the coronagraph's centre: what it leaves of an off-axis source there."""
        r2 = (np.asarray(dx) ** 2 + np.asarray(dy) ** 2) / self.instrument.lambda_d**2
        return occulter_amplitude(r2, self.sigma) ** 2

    def image(self, offset: tuple[float, float], aberration: np.ndarray, occulted: bool = True):
        """Intensity (ny, nx) of a unit-flux point source ``offset`` pixels from the centre."""
        n = self.grid
        v, u = np.mgrid[:n, :n] - n / 2
        # a source offset by (dx, dy) pixels is a phase ramp of (dx, dy) cycles across the grid
        tilt = 2 * np.pi * (offset[0] * u + offset[1] * v) / n
        field = self.pupil * np.exp(1j * (aberration + tilt))
        focal = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(field)))
        if occulted:
            focal *= self.mask
        lyot_plane = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(focal))) * self.lyot
        final = np.abs(np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(lyot_plane)))) ** 2
        unocculted_peak = (self.pupil.sum() * 1.0) ** 2
        (ny, nx), (cx, cy) = self.instrument.shape, self.instrument.centre
        crop = final[n // 2 - cy : n // 2 - cy + ny, n // 2 - cx : n // 2 - cx + nx]
        # the peak holds about 1/(π·(λ/D)²) of the flux of a PSF sampled at λ/D pixels
        return crop / unocculted_peak * _PEAK_TO_FLUX * (2.0 / self.instrument.lambda_d) ** 2


_PEAK_TO_FLUX = 0.25  # peak fraction of a λ/D=2-pixel Airy-like PSF's total flux
