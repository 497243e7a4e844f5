"""Companions measured in a run's own cluster session (``coron-dask run --companions``):
once the run's products are placed, each candidate of its detection at S/N ≥ ``min-snr``
is fitted, and the science with every fitted companion subtracted is reduced, on the same
client, without aligning the references again.

The KL bases are made again from what the run wrote: its crfints (the science flagged)
and its psfalign (the references aligned to each integration), read lazily from disk; the
science is filled as the run filled it and KLIP's weights are computed again over the same
zones and cutoffs (a pass over the references, not outlier_detection nor align_refs). On
those bases the companions' windows are made (``companions.windows_product``, written in
one computation), each companion fitted from them (``companions.fit_companions``), and
the residual i2d reduced: every fitted companion injected with the opposite contrast at
its fitted separation and PA into every science integration, dimmed by the coronagraph's
transmission as the fit's model is, and reduced through the science's own fill, bases,
cutoffs and resample (``science.injection.injected_psfsubs``):
``<product>_residual_i2d.fits``. Its S/N at each companion's place (``residual_snr``) is
in ``<product>_companions.ecsv`` and the companion's quicklook.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError, record_on_disk
from coron_dask.pipeline.build import Reduction
from coron_dask.pipeline.companion_adi import planned_windows
from coron_dask.pipeline.companion_outputs import fitted_table, write_companion_products
from coron_dask.pipeline.companion_residual import (
    reduction_from_products,
    residual_product,
)
from coron_dask.pipeline.companion_starts import (
    Guess,
    candidate_guesses,
    check_places,
    fitted_candidates,
)
from coron_dask.pipeline.companions import (
    check_mode,
    fit_companions,
    walkers_on,
    windows_product,
)
from coron_dask.science.companion_fit import FitSettings
from coron_dask.science.geometry import lambda_over_d, pixel_scale_arcsec, sky_wcs
from coron_dask.science.injection import read_offaxis_psf
from coron_dask.science.transmission import Transmission, coronagraph_transmission
from coron_dask.steps.klip_parameters import kl_cutoffs

log = logging.getLogger(__name__)
__all__ = ["FitSettings", "SessionCompanions"]


@dataclass
class SessionCompanions:
    """What ``run_coron3(..., companions=...)`` fits after the run, on its cluster: the
    candidates of S/N ≥ ``min_snr`` (default ``coron_dask.companions.min-snr``) with the
    off-axis PSF ``offaxis_psf``; the other fields as ``companions.measure_companions``'."""

    offaxis_psf: str | Path
    star_flux: float | None = None
    resolution: float | None = None
    cutoff: int | None = None
    transmission: str | Path | None = None
    settings: FitSettings | None = None
    min_snr: float | None = None
    star_position_error: float = 0.0
    plate_scale_error: float = 0.0

    def prepared(
        self,
        asn: str | Path,
        output_dir: str | Path,
        parameters: dict,
        observation,
        psfmask: str | Path | None,
    ) -> Callable:
        """Check the request against the run's ``parameters`` (before anything starts:
        CoronInputError naming the option) and give the work that follows the run
        (``run.execute_on_cluster``'s ``after``)."""
        check_mode(parameters)
        if "resample" in parameters["skip"]:
            raise CoronInputError("skip", "--companions fits the i2d's candidates: keep resample")
        if not parameters["save_psfalign"]:
            raise CoronInputError(
                "save_psfalign",
                "--companions makes the KL bases again from the run's psfalign: drop "
                "--no-psfalign (or fit with coron-dask companions)",
            )
        if parameters["format"] != "fits":
            raise CoronInputError(
                "format", "--companions reads the run's products as FITS files: not zarr"
            )
        if parameters["maxnumbasis"] is not None:
            raise CoronInputError(
                "maxnumbasis", "--companions fits bases of every reference: not with --maxnumbasis"
            )
        cutoffs = kl_cutoffs(parameters["truncate"])
        if self.cutoff is not None and int(self.cutoff) not in cutoffs:
            raise CoronInputError("kl", f"{self.cutoff} is not one of --truncate's {cutoffs}")
        for name in ("star_position_error", "plate_scale_error"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise CoronInputError(name, f"must be >= 0, got {value}")
        threshold = config.get("companions.min-snr") if self.min_snr is None else self.min_snr
        if not threshold > 0:
            raise CoronInputError("min_snr", f"must be > 0, got {threshold}")
        psf = read_offaxis_psf(self.offaxis_psf, self.star_flux)
        first = observation.science[0]
        dimming = coronagraph_transmission(self.transmission, psfmask, first)
        resolution = self.resolution or lambda_over_d(
            first.attrs.get("FILTER", "?"), pixel_scale_arcsec(sky_wcs(first)) / 3600
        )
        settings = self.settings or FitSettings.configured()

        def measure(write: Callable, paths: list[Path], workers, client) -> list[Path]:
            iwa = float(parameters["iwa"])
            guesses = _candidates(paths, threshold, self.cutoff, observation, iwa)
            if not guesses:
                return []

            written = {Path(path).name: Path(path) for path in paths}  # the run's products

            rolls = len(observation.science)
            windows = planned_windows(len(guesses), rolls, psf, settings, resolution)

            def remade(stage: str) -> Reduction:
                return reduction_from_products(
                    asn,
                    output_dir,
                    written,
                    parameters,
                    observation,
                    psfmask,
                    workers,
                    stage,
                    windows,
                )

            spread = walkers_on(client, parameters["mode"], settings)
            found = (guesses, psf, dimming, resolution, settings, spread)
            return self._measured(write, paths, remade, *found)

        return measure

    def _measured(
        self,
        write: Callable,
        paths: list[Path],
        remade: Callable[[str], Reduction],
        guesses: list[Guess],
        psf: np.ndarray,
        dimming: Transmission,
        resolution: float,
        settings: FitSettings,
        spread: Callable | None,
    ) -> list[Path]:
        """The windows written, the companions fitted (``spread``: as ``fit_companion``'s),
        the residual i2d written, then the table and the quicklooks: the paths written
        (recorded on an error). ``remade`` gives the reduction for each of the two
        computations (``reduction_from_products``)."""
        output_dir = Path(paths[0]).parent
        i2d = next(p for p in paths if Path(p).name.endswith("_i2d.fits"))
        name = Path(i2d).name.removesuffix("_i2d.fits")
        reduction = remade("windows")
        windows = windows_product(reduction, guesses, psf, resolution, settings, output_dir, name)
        written = write([windows])
        try:
            found = fit_companions(
                windows.path,
                psf,
                cutoff=self.cutoff,
                transmission=dimming,
                settings=settings,
                spread=spread,
            )
            residual = residual_product(remade("residual"), found, dimming, output_dir, name)
            written += write([residual])
            cutoffs = list(reduction.bases[0].cutoffs)
            table = fitted_table(
                found,
                reduction.science[0],
                dict(fits.getheader(i2d)),
                i2d=Path(i2d),
                residual=residual.path,
                cutoffs=cutoffs,
                resolution=resolution,
                offaxis_psf=self.offaxis_psf,
                transmission_source=dimming.source,
                star_position_error=self.star_position_error,
                plate_scale_error=self.plate_scale_error,
            )
            written += write_companion_products(table, found, output_dir, name)
        except BaseException as error:
            record_on_disk(error, written)
            raise
        return written


def _candidates(
    paths: list[Path], threshold: float, cutoff: int | None, observation, iwa: float
) -> list[Guess]:
    """The run's candidates (its ``_candidates.ecsv``) of S/N ≥ ``threshold`` that lie on
    every science frame outside the inner working angle (the others logged); of a KL-mode
    cube, those found on the plane fitted (``cutoff``; None: the largest)."""
    ecsv = next(p for p in paths if Path(p).name.endswith("_candidates.ecsv"))
    table = Table.read(ecsv, format="ascii.ecsv")
    kept = fitted_candidates(table, threshold, cutoff, Path(ecsv).name)
    if not len(kept):
        log.info("companions: no candidate to fit: no companions table written")
        return []
    guesses = []
    for guess in candidate_guesses(kept):
        try:
            check_places(observation.science, [guess], iwa)
        except CoronInputError as error:
            log.warning("companions: %s not fitted", str(error).split(": ", 1)[-1])
            continue
        guesses.append(guess)
    return guesses
