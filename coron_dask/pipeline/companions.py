"""Companions measured on an association: the science reduction (RDI) and, in the same
computation, what each companion's exact forward model needs (``steps.forward_model``),
written as one product, ``<product>_fmwindows.fits``; then each companion fitted
(``science.companion_fit``) from that product alone, so a fit can be redone with other
settings without reducing again (``fit_companions``).

The product holds, per science exposure k (a roll): ``MEAN<k>`` the integration-mean
psfsub (kl, y, x), ``KLWIN<k>`` the KL images on each companion's window (companion,
integration, K, wy, wx), ``LABELS<k>`` the windows' zones (−1: none), ``BAD<k>`` the
pixels align_refs filled in any integration, ``ZONES<k>`` the zones' pixel counts; each
extension with the exposure's WCS keywords and the windows' corners (``Y0_<j>``,
``X0_<j>``); the primary header the star (TARG_RA, TARG_DEC), λ/D (``RESOLUTN``), the KL
cutoffs (``KLMODE<i>``) and each companion's start (``SEP_<j>``, ``PA_<j>``).
"""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from coron_dask.core.dqflags import bit_value
from coron_dask.core.errors import CoronInputError, record_on_disk
from coron_dask.io import Extension, Product
from coron_dask.pipeline.build import Reduction, kl_keywords, reduce_observation
from coron_dask.pipeline.companion_adi import (
    adi_extensions,
    check_adi,
    filled_in_references,
    planned_windows,
    read_adi_windows,
    window_shape,
)
from coron_dask.pipeline.companion_outputs import fitted_table, write_companion_products
from coron_dask.pipeline.companion_residual import (
    ScratchForResidual,
    reduction_from_products,
    residual_product,
)
from coron_dask.pipeline.companion_starts import Guess, candidate_guesses, check_places
from coron_dask.pipeline.observation import find_psfmask
from coron_dask.pipeline.run import check_inputs, execute_on_cluster, observation_bytes, run_inputs
from coron_dask.runtime.spread import walker_spreader
from coron_dask.science.companion_fit import FitSettings, fit_companion
from coron_dask.science.companion_model import Roll, detector_place, window_for
from coron_dask.science.companion_result import CompanionFit
from coron_dask.science.geometry import (
    lambda_over_d,
    pixel_scale_arcsec,
    sky_wcs,
    star_position,
)
from coron_dask.science.injection import read_offaxis_psf
from coron_dask.science.transmission import Transmission, coronagraph_transmission
from coron_dask.steps.forward_model import kl_windows, window_labels, zone_sizes

log = logging.getLogger(__name__)
__all__ = ["Guess", "candidate_guesses", "fit_companions", "measure_companions"]


def check_mode(parameters: dict) -> None:
    """RDI: the exact forward model; ADI and ADI+RDI: negative injection, exact, on every
    reference a zone may use (a choice by correlation, ``maxnumbasis``, is refused)."""
    check_adi(parameters)


def _on_window(image: da.Array, corners: np.ndarray, shape: tuple, fill: object) -> da.Array:
    """(n, wy, wx) windows of a lazy 2-D ``image``, ``fill`` beyond its edges."""
    reach = max(shape) + int(np.abs(corners).max()) + max(image.shape)
    padded = da.pad(image.rechunk(-1), reach, constant_values=fill).rechunk(-1)  # one block
    return da.stack(
        [
            padded[y0 + reach : y0 + reach + shape[0], x0 + reach : x0 + reach + shape[1]]
            for y0, x0 in corners
        ]
    )


def windows_product(
    reduction: Reduction,
    guesses: list[Guess],
    psf: np.ndarray,
    resolution: float,
    settings: FitSettings,
    output_dir: Path,
    name: str,
) -> Product:
    """``<name>_fmwindows.fits`` (see the module's docstring), lazy, for ``reduction``."""
    p = reduction.parameters
    check_mode(p)
    first = reduction.science[0]
    star = star_position(first.attrs, first.encoding.get("source", "science"))
    half, margin = window_shape(psf, settings, resolution)
    bits = bit_value(p["bad_bits"])
    cutoffs = reduction.bases[0].cutoffs
    primary = {
        **first.attrs,
        "DATAMODL": "FMWindows",
        "RESOLUTN": (resolution, "lambda/D, pixels"),
        "NCOMP": (len(guesses), "companions"),
        **kl_keywords(tuple(cutoffs)),
    }
    for j, guess in enumerate(guesses):
        primary[f"SEP_{j}"] = (guess.separation, "start separation, arcsec")
        primary[f"PA_{j}"] = (guess.position_angle, "start position angle, deg E of N")
        primary[f"NAME_{j}"] = guess.name or f"companion {j + 1}"
    extensions, group = [], reduction.plan.windows  # windows per task: the plan's
    filled = [
        (((e["dq"].data & bits) > 0) | da.isnan(e["sci"].data)).any(axis=0)
        for e in reduction.science
    ]  # the pixels align_refs fills in any integration of each exposure
    for k, (exposure, basis, psfsub) in enumerate(
        zip(reduction.science, reduction.bases, reduction.psfsubs, strict=True)
    ):
        wcs = sky_wcs(exposure)
        frame = (exposure.sizes["y"], exposure.sizes["x"])
        found = [
            window_for(detector_place(wcs, star, g.separation, g.position_angle)[0], half, margin)
            for g in guesses
        ]
        corners, shape = np.array([f[0] for f in found]), found[0][1]
        header = {**dict(wcs.to_header())}
        for j, (y0, x0) in enumerate(corners):
            header[f"Y0_{j}"], header[f"X0_{j}"] = int(y0), int(x0)
        sci = psfsub["sci"].data
        mean = (sci if "kl" in psfsub["sci"].dims else sci[None]).mean(axis=1)
        bad = _on_window(filled[k], corners, shape, True)
        labels = window_labels(basis.zones, frame, corners, shape)
        if p["mode"] != "RDI":  # negative injection's arrays, in place of KL images
            slack = int(np.ceil(settings.align_slack * resolution))
            extensions += adi_extensions(reduction, k, guesses, star, half, margin, slack, header)
            bad = bad | filled_in_references(reduction, k, star, filled, corners, shape, _on_window)
        extensions += [
            Extension(f"MEAN{k}", mean, header),
            Extension(
                f"KLWIN{k}",
                kl_windows(basis, corners, shape, group) if p["mode"] == "RDI" else np.zeros(1),
                header,
            ),
            Extension(f"LABELS{k}", labels, header),
            Extension(f"BAD{k}", bad.astype(np.uint8), header),
            Extension(f"ZONES{k}", zone_sizes(basis.zones, frame), header),
        ]
    return Product(output_dir / f"{name}_fmwindows.fits", primary, extensions)


def walkers_on(client, mode: str, settings: FitSettings) -> Callable | None:
    """With ADI on a distributed ``client``: the sampler's steps evaluated on its workers
    (``runtime.spread``; ``companions.spread-walkers``); else None, in this process."""
    if client is None or mode == "RDI" or not settings.spread_walkers:
        return None
    log.info("companions: each step's walkers evaluated on the cluster's workers")
    return walker_spreader(client)


def read_windows(path: str | Path, cutoff: int | None = None) -> tuple[list, list, dict]:
    """A ``_fmwindows.fits`` product read back: per companion its rolls (``Roll``, one per
    science exposure) and its start (separation, position angle, name); and ``star``,
    ``resolution`` and the KL ``cutoff`` (one of the run's; default the largest)."""
    with fits.open(path) as hdul:
        primary = hdul[0].header
        cutoffs = [int(primary[f"KLMODE{i}"]) for i in range(len(hdul)) if f"KLMODE{i}" in primary]
        cutoff = cutoffs[-1] if cutoff is None else int(cutoff)
        if cutoff not in cutoffs:
            raise CoronInputError(
                "cutoff", f"{cutoff} is not one of the run's KL cutoffs {cutoffs}"
            )
        plane = cutoffs.index(cutoff)
        rolls_of = [[] for _ in range(primary["NCOMP"])]
        k = 0
        while f"MEAN{k}" in hdul:
            header = hdul[f"LABELS{k}"].header
            wcs = WCS(header, naxis=2)
            mean = hdul[f"MEAN{k}"].data[plane].astype(np.float64)
            images, labels = hdul[f"KLWIN{k}"].data, hdul[f"LABELS{k}"].data
            bad, sizes = hdul[f"BAD{k}"].data.astype(bool), hdul[f"ZONES{k}"].data
            adi = f"ADI{k}_ROWS" in hdul
            for j, rolls in enumerate(rolls_of):
                corner = (int(header[f"Y0_{j}"]), int(header[f"X0_{j}"]))
                rolls.append(
                    Roll(
                        f"exposure {k}",
                        mean,
                        None if adi else np.array(images[j]),
                        labels[j],
                        sizes,
                        corner,
                        bad[j],
                        wcs,
                        read_adi_windows(hdul, k, j) if adi else None,
                    )
                )
            k += 1
        starts = [
            (primary[f"SEP_{j}"], primary[f"PA_{j}"], primary[f"NAME_{j}"])
            for j in range(len(rolls_of))
        ]
        about = dict(
            star=star_position(primary, path),
            resolution=float(primary["RESOLUTN"]),
            cutoff=cutoff,
        )
    return rolls_of, starts, about


def fit_companions(
    path: str | Path,
    psf: np.ndarray,
    *,
    cutoff: int | None = None,
    transmission: Transmission | None = None,
    settings: FitSettings | None = None,
    spread: Callable | None = None,
) -> list[CompanionFit]:
    """Fit every companion of a ``_fmwindows.fits`` product (``windows_product``) with the
    off-axis ``psf`` (odd box, the star's flux) at KL ``cutoff`` (one of the run's; default
    the largest), dimmed by the coronagraph's ``transmission`` (None: none); ``spread``
    as ``fit_companion``'s."""
    settings = settings or FitSettings.configured()
    rolls_of, starts, about = read_windows(path, cutoff)
    return [
        fit_companion(
            rolls,
            psf,
            about["star"],
            (separation, angle),
            resolution=about["resolution"],
            cutoff=about["cutoff"],
            transmission=transmission,
            settings=settings,
            name=name,
            spread=spread,
        )
        for rolls, (separation, angle, name) in zip(rolls_of, starts, strict=True)
    ]


def measure_companions(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    offaxis_psf: str | Path,
    guesses: list[Guess],
    star_flux: float | None = None,
    resolution: float | None = None,
    cutoff: int | None = None,
    psfmask: str | Path | None = None,
    transmission: str | Path | None = None,
    settings: FitSettings | None = None,
    star_position_error: float = 0.0,
    plate_scale_error: float = 0.0,
    execution: dict | None = None,
    **parameters: object,
) -> tuple[list[CompanionFit], list[Path]]:
    """Reduce an association (RDI, ``build_products``' ``parameters``) and fit the
    companions near ``guesses`` (see the module's docstring): the fits, and the products
    written: ``_fmwindows.fits``, ``<product>_residual_i2d.fits`` (on the same cluster
    after the fits: ``pipeline.companion_residual``), ``<product>_companions.ecsv``
    (``science.companion_table``, the reduction's provenance in its meta) and
    ``<product>_companion<N>.png`` per companion; its i2d, science crfints and aligned
    references are hidden scratch files, removed at the end.
    ``star_position_error`` (mas) and ``plate_scale_error`` (fraction) are added in
    quadrature to the astrometric errors. ``offaxis_psf``, ``star_flux``, ``resolution``,
    ``psfmask``, ``transmission`` and ``execution`` as for ``pipeline.contrast``."""
    psfmask = find_psfmask(asn, psfmask)
    parameters, observation = check_inputs(asn, output_dir, psfmask=psfmask, **parameters)
    check_mode(parameters)
    if parameters["format"] != "fits":  # the i2d, crfints and aligned references read back
        raise CoronInputError("format", "companions reads its reduction as FITS files: not zarr")
    if not guesses:
        raise CoronInputError("guesses", "no companion to fit")
    check_places(observation.science, guesses, float(parameters["iwa"]))
    for name, value in (
        ("star_position_error", star_position_error),
        ("plate_scale_error", plate_scale_error),
    ):
        if not (np.isfinite(value) and value >= 0):
            raise CoronInputError(name, f"must be >= 0, got {value}")
    parameters["save_psfalign"] = False  # the aligned references go to a scratch file
    settings = settings or FitSettings.configured()
    psf = read_offaxis_psf(offaxis_psf, star_flux)
    first = observation.science[0]
    dimming = coronagraph_transmission(transmission, psfmask, first)
    if resolution is None:
        resolution = lambda_over_d(
            first.attrs.get("FILTER", "?"), pixel_scale_arcsec(sky_wcs(first)) / 3600
        )
    name = observation.association.product_name
    output_dir = Path(output_dir)
    built: dict = {}

    windows = planned_windows(len(guesses), len(observation.science), psf, settings, resolution)
    planned = {"windows": windows, "opened": observation}  # the block plan makes room

    def build(workers) -> list[Product]:
        reduction = reduce_observation(
            asn, output_dir, psfmask=psfmask, workers=workers, **planned, **parameters
        )
        made = [p.primary for p in reduction.products if not p.scratch and p.kind == "i2d"]
        made = made or [p.primary for p in reduction.products if not p.scratch]  # the science's
        built["provenance"] = {k: v[0] if isinstance(v, tuple) else v for k, v in made[-1].items()}
        built["windows"] = windows_product(
            reduction, guesses, psf, resolution, settings, output_dir, name
        )
        # the i2d, for the S/N: a scratch file of this command, read and removed once
        # the companions are fitted, so that a run's i2d in the folder stays as it is
        built["i2d"] = [p for p in reduction.products if p.kind == "i2d"]
        for item in built["i2d"]:
            item.path = item.path.with_name(f".companions_{item.path.name}")
        built["cutoffs"] = list(reduction.bases[0].cutoffs)
        # what the residual i2d is reduced from, after the fits: hidden scratch files too
        residual = bool(built["i2d"])
        built["kept"] = ScratchForResidual.of(reduction, observation, output_dir, residual)
        return [
            *(item for item in reduction.products if item.scratch),
            *built["i2d"],
            *built["kept"].products,
            built["windows"],
        ]

    def measure(write, paths: list[Path], workers, client) -> list[Path]:
        """The fits (ADI's walkers on the cluster's workers: ``runtime.spread``), then on
        the same cluster the residual i2d, then the table and the quicklooks: the paths
        written (the scratch files removed, whatever happens)."""
        kept, written = built["kept"], [built["windows"].path]  # an error leaves these
        spread = walkers_on(client, parameters["mode"], settings)
        try:
            kept.placed()
            built["fits"] = found = fit_companions(
                built["windows"].path,
                psf,
                cutoff=cutoff,
                transmission=dimming,
                settings=settings,
                spread=spread,
            )
            i2ds = [item.path for item in built["i2d"]]
            cutoffs = built["cutoffs"]
            residual = None
            if kept.products:  # the science with every fitted companion subtracted
                again = reduction_from_products(
                    asn, output_dir, kept.written, parameters, observation, psfmask, workers
                )
                residual = residual_product(again, found, dimming, output_dir, name)
                written += write([residual])
            table = fitted_table(
                found,
                first,
                built["provenance"],
                i2d=i2ds[0] if i2ds else None,
                residual=None if residual is None else residual.path,
                cutoffs=cutoffs,
                resolution=resolution,
                offaxis_psf=offaxis_psf,
                transmission_source=dimming.source,
                star_position_error=star_position_error,
                plate_scale_error=plate_scale_error,
            )
            written += write_companion_products(table, found, output_dir, name)
        except BaseException as error:
            record_on_disk(error, written)
            raise
        finally:
            kept.remove()
            for path in built["i2d"]:
                path = path.path
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return written

    inputs = [*run_inputs(observation, psfmask), Path(offaxis_psf)]
    execution = {"output_dir": output_dir, "inputs": inputs, **(execution or {})}
    paths = execute_on_cluster(
        build,
        data_bytes=observation_bytes(observation, parameters["align_to"]),
        after=measure,
        **execution,
    )
    paths = dict.fromkeys(path for path in paths if Path(path).exists())  # not the scratch
    return built["fits"], list(paths)
