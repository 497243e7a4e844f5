"""The contrast curve of an association: the science reduction with synthetic companions
injected (``science.injection``), dimmed by the coronagraph's transmission
(``science.transmission``), run in one computation, measured
(``science.contrast.measure``) and drawn (``quicklook``)."""

import logging
from pathlib import Path

import numpy as np
from astropy.io import fits

from coron_dask.core.errors import CoronInputError, record_on_disk
from coron_dask.io import Product
from coron_dask.pipeline.build import reduce_observation
from coron_dask.pipeline.observation import find_psfmask
from coron_dask.pipeline.run import (
    check_inputs,
    execute_on_cluster,
    observation_bytes,
    run_inputs,
)
from coron_dask.science.contrast import measure, summary
from coron_dask.science.geometry import (
    lambda_over_d,
    pixel_scale_arcsec,
    sky_wcs,
    star_position,
)
from coron_dask.science.injection import (
    build_injections,
    companion_sets,
    default_separations,
    read_offaxis_psf,
)
from coron_dask.science.transmission import coronagraph_transmission
from coron_dask.steps.klip_parameters import kl_cutoffs

log = logging.getLogger(__name__)


def contrast_curve(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    offaxis_psf: str | Path,
    star_flux: float | None = None,
    separations: list[float] | None = None,
    position_angles: tuple[float, ...] = (0.0, 120.0, 240.0),
    inject_contrast: float = 1e-4,
    resolution: float | None = None,
    psfmask: str | Path | None = None,
    transmission: str | Path | None = None,
    execution: dict | None = None,
    **parameters: object,
) -> list[Path]:
    """Measure the 5σ contrast curve of an association (see the module's docstring) and
    write ``<product>_contrast.ecsv`` (one row per separation and KL cutoff; the injected
    companions' measurements in its metadata), ``<product>_contrast.png`` and
    ``<product>_injections.fits`` (the science i2d, each injected set's i2d, the
    companions' model i2ds); return their paths.

    ``offaxis_psf``: the star unocculted (FITS image, the calints' units; ``star_flux``
    rescales it to that total). ``separations`` (arcsec; default: 10 from 3 λ/D to the
    field's edge) × ``position_angles`` (degrees east of north, one set each) companions of
    ``inject_contrast``. ``resolution``: λ/D in pixels (default: from FILTER's pivot
    wavelength). ``transmission``: the coronagraph's transmission each injected companion is
    dimmed by at its detector place in each roll: "psfmask", "none" or a FITS map in the
    frames' pixels (default: the PSFMASK for NIRCam, none for MIRI). ``parameters``: those
    of ``build_products`` (the science reduction's); ``execution``: those of
    ``execute_on_cluster`` (the pipeline's run).
    """
    psfmask = find_psfmask(asn, psfmask)
    parameters, observation = check_inputs(asn, output_dir, psfmask=psfmask, **parameters)
    if "resample" in parameters["skip"]:
        raise CoronInputError("skip", "the contrast curve is measured on the i2d: keep resample")
    if not inject_contrast > 0:
        raise CoronInputError("inject_contrast", f"must be > 0, got {inject_contrast}")
    parameters["save_psfalign"] = False  # the aligned references go to a scratch file
    psf = read_offaxis_psf(offaxis_psf, star_flux)
    first = observation.science[0]
    dimming = coronagraph_transmission(transmission, psfmask, first)
    star = star_position(first.attrs, first.encoding.get("source", "science"))
    scale = pixel_scale_arcsec(sky_wcs(first))
    if resolution is None:
        resolution = lambda_over_d(first.attrs.get("FILTER", "?"), scale / 3600)
        log.info("contrast: λ/D %.2f px (%s)", resolution, first.attrs.get("FILTER"))
    if separations is None:
        separations = default_separations(first, star, resolution)
    if min(separations) <= 0:
        raise CoronInputError("separations", f"must be > 0 arcsec, got {separations}")
    companions = companion_sets(sorted(separations), list(position_angles), inject_contrast)
    log.info(
        "contrast: %d set(s) of %d companions of contrast %g, %.3g to %.3g arcsec",
        len(companions),
        len(separations),
        inject_contrast,
        min(separations),
        max(separations),
    )
    name = observation.association.product_name
    output_dir = Path(output_dir)
    built: dict = {}

    def build(workers) -> list[Product]:
        reduction = reduce_observation(
            asn,
            output_dir,
            psfmask=psfmask,
            workers=workers,
            injections=len(companions),
            opened=observation,
            **parameters,
        )
        built["injections"] = build_injections(
            reduction, psf, companions, output_dir, name, dimming
        )
        built["truncate"] = reduction.parameters["truncate"]  # as klip uses it
        scratch = [product for product in reduction.products if product.scratch]
        return [*scratch, built["injections"].product]

    data = observation_bytes(observation, parameters["align_to"])
    inputs = run_inputs(observation, psfmask)  # and the off-axis PSF: a run taken up reuses
    inputs += [Path(offaxis_psf)] if isinstance(offaxis_psf, str | Path) else []
    execution = {"output_dir": output_dir, "inputs": inputs, **(execution or {})}
    paths = execute_on_cluster(build, data_bytes=data, **execution)
    written = list(paths)  # an error from here on leaves these on disk, and says so
    try:
        injections = built["injections"]
        with fits.open(injections.product.path) as hdul:
            science, injected, model = (
                hdul[n].data.astype(np.float64) for n in ("SCI", "INJECTED", "MODEL")
            )
        cutoffs = kl_cutoffs(built["truncate"])
        if isinstance(built["truncate"], int):  # jwst's layout: no kl axis
            science, injected = science[None], injected[:, None]
        table, measured = measure(
            science,
            injected,
            model,
            injections.grid,
            star,
            companions,
            resolution,
            cutoffs,
            injections.transmissions,
            injections.integrations,
        )
        table.meta["filter"] = str(first.attrs.get("FILTER", ""))
        table.meta["injected_contrast"] = inject_contrast
        table.meta["transmission"] = dimming.source
        table.meta["mode"] = parameters["mode"]  # KLIP's references (ADI: own bases per set)
        table.meta["movement"] = parameters["movement"]
        table.meta["injections"] = [
            dict(zip(measured.colnames, row, strict=True)) for row in measured.iterrows()
        ]
        ecsv = output_dir / f"{name}_contrast.ecsv"
        partial = ecsv.with_name(ecsv.name + ".partial")
        table.write(partial, format="ascii.ecsv", overwrite=True)
        partial.replace(ecsv)
        written.append(ecsv)
        from coron_dask.quicklook.figures import contrast_figure  # matplotlib: once measured

        png = contrast_figure(table, output_dir / f"{name}_contrast.png")
        for line in summary(table):
            log.info("contrast: %s", line)
    except BaseException as error:
        record_on_disk(error, written)
        raise
    return [*paths, ecsv, png]
