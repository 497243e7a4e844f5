"""The residual i2d of fitted companions: the science with every companion subtracted,
reduced as the science is, on KL bases made again from a reduction's products on disk.

``reduction_from_products`` makes a reduction's bases again from what it wrote: the
science from its crfints (flagged), the references from its psfalign (aligned), read
lazily; the science filled as align_refs fills it and KLIP's weights computed again over
the same zones, cutoffs and block plan: a pass over the references, not outlier_detection
nor align_refs. ``residual_product`` injects every fitted companion with the opposite
contrast at its posterior median separation and PA into every science integration,
dimmed by the coronagraph's transmission as its model is, and reduces it through those
bases, the science's fill, cutoffs and resample (``science.injection.injected_psfsubs``):
``<product>_residual_i2d.fits``. ``companions`` keeps what it needs for this as hidden
scratch files (``ScratchForResidual``), removed at the end.
"""

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
from astropy.io import fits
from dask.base import tokenize

from coron_dask.io import Extension, Product, open_exposure, open_product
from coron_dask.pipeline.build import Reduction, kl_keywords, reduce_observation
from coron_dask.pipeline.observation import exposure_root
from coron_dask.science.companion_result import CompanionFit
from coron_dask.science.geometry import star_position
from coron_dask.science.injection import Companion, injected_psfsubs
from coron_dask.science.transmission import Transmission
from coron_dask.steps.align_refs import median_replace_img
from coron_dask.steps.klip import kl_basis, subtract
from coron_dask.steps.references import eligible_references, roll_angle
from coron_dask.steps.resample import resample

log = logging.getLogger(__name__)
__all__ = [
    "ScratchForResidual",
    "product_names",
    "reduction_from_products",
    "residual_product",
]


#: The end of the name of the scratch file holding align_refs' fits (``pipeline.build``)
FITS = "_fits.fits"


def fits_name(psfalign: str) -> str:
    """The fits' scratch file of the reduction that writes the psfalign ``psfalign``."""
    return psfalign.removesuffix("_psfalign.fits") + FITS


def product_names(observation) -> tuple[list[str], list[str]]:
    """The names a run gives each science exposure's crfints and psfalign (FITS)."""
    asn_id = observation.association.asn_id
    roots = [f"{exposure_root(exposure)}_{asn_id}" for exposure in observation.science]
    return [f"{r}_crfints.fits" for r in roots], [f"{r}_psfalign.fits" for r in roots]


def reduction_from_products(
    asn: str | Path,
    output_dir: str | Path,
    written: dict[str, Path],
    parameters: dict,
    observation,
    psfmask: str | Path | None,
    workers,
    stage: str = "companions",
    windows: tuple = (0, (0, 0)),
) -> Reduction:
    """The reduction of ``parameters`` made again, lazily, from its products on disk
    (``written``: where each is, by the name a run gives it, ``product_names``): the
    science from its crfints (the calints with outlier_detection skipped), the references
    aligned from its psfalign (with ADI, its ALIGN's kinds, rolls and fits: the zones'
    references chosen by movement again, the injections moved by the fits), the KL bases
    and psfsubs from them on the same zones, cutoffs and block plan (see the module's
    docstring). No product of its own. Its keys
    are its ``stage``'s own: two computations on one client never submit one key with
    two graphs (dask optimises each graph in its own way). ``windows``: the companions'
    windows the block plan makes room for (``companion_adi.planned_windows``)."""
    run = reduce_observation(
        asn,
        output_dir,
        psfmask=psfmask,
        workers=workers,
        opened=observation,
        windows=windows,
        **parameters,
    )
    p = run.parameters
    crfints, psfaligns = product_names(observation)
    science, bases, psfsubs, psfalign_list = [], [], [], []
    fill = (p["median_box_length"], p["bad_bits"])
    for k, (exposure, basis) in enumerate(zip(run.science, run.bases, strict=True)):
        chunks = {"integration": exposure["sci"].data.chunks[0][0]}
        if "outlier_detection" not in p["skip"]:
            flagged = open_exposure(written[crfints[k]], chunks)
            flagged.encoding.update(exposure.encoding)  # the calints it was made from
            exposure = flagged
        exposure = exposure.assign(
            {name: _staged(exposure[name], stage) for name in ("sci", "err", "dq")}
        )
        opened = open_product(written[psfaligns[k]])
        sci = _staged(opened["SCI"].chunk({"psf": run.plan.psfs}), stage)
        aligned = xr.Dataset({"sci": sci})
        chosen = None  # ADI: the references each zone may use (movement), and the fits
        if p["mode"] != "RDI":  # what each reference is, and the fits ADI's injections
            planned = run.psfaligns[k]  # move companions by (the run's, or align_refs' FIT)
            names = [n for n in planned.coords if n != "psf"]
            aligned = aligned.assign_coords({n: planned[n] for n in names})
            if "shift" in opened:
                converged = opened["converged"].astype(float).expand_dims(param=["converged"])
                fit = xr.concat([opened["shift"], converged], "param").transpose(..., "param")
                fit = fit.rename(param="fit").drop_vars("fit")
            else:
                values = fits.getdata(written[fits_name(psfaligns[k])], "FIT")
                fit = xr.DataArray(np.asarray(values, np.float64), dims=planned["fit"].dims)
            aligned["fit"] = fit.chunk({"psf": run.plan.psfs})
            chunks = exposure["sci"].data.chunks[0]
            source = Path(exposure.encoding.get("source", "science")).name
            roll = roll_angle(exposure)
            chosen = eligible_references(
                aligned, roll, basis.zones, p["movement"], chunks, source=source
            )[:1]
        filled = median_replace_img(exposure, *fill)
        made = kl_basis(
            filled, aligned, p["truncate"], rows=basis.rows, zones=basis.zones, chosen=chosen
        )
        science.append(exposure)
        bases.append(made)
        psfsubs.append(subtract(filled, made))
        psfalign_list.append(aligned)
    log.info("companions: KL bases made again from the crfints and psfalign on disk")
    return Reduction([], science, bases, psfsubs, p, run.plan, psfalign_list)


def _staged(variable: xr.DataArray, stage: str) -> xr.DataArray:
    """``variable`` read under keys of ``stage``'s own (its blocks as they are)."""
    data = variable.data
    renamed = data.map_blocks(
        np.asarray, dtype=data.dtype, name=f"read-{stage}-" + tokenize(data, stage)
    )
    return variable.copy(data=renamed)


def residual_product(
    reduction: Reduction,
    found: list[CompanionFit],
    transmission: Transmission | None,
    output_dir: Path,
    name: str,
) -> Product:
    """``<name>_residual_i2d.fits``, lazy: the i2d of ``reduction``'s science with every
    fitted companion (``found``) subtracted: injected at its posterior median separation,
    PA and contrast with the opposite sign, through its fit's PSF box, dimmed by
    ``transmission`` as its model was, and reduced as the science is."""
    science = reduction.science
    star = star_position(science[0].attrs, science[0].encoding.get("source", "science"))
    members = [
        Companion(0, f.separation.median, f.position_angle.median, -f.contrast.median)
        for f in found
    ]
    subs, _ = injected_psfsubs(reduction, found[0].model.psf, members, star, transmission)
    i2d, grid = resample(subs, science, orientation=reduction.parameters["orientation"])
    primary = {
        **science[0].attrs,
        "DATAMODL": "ImageModel",
        "NCOMP": (len(found), "fitted companions subtracted"),
    }
    for j, fit in enumerate(found):
        primary[f"SEP_{j}"] = (fit.separation.median, "subtracted at separation, arcsec")
        primary[f"PA_{j}"] = (fit.position_angle.median, "subtracted at PA, deg E of N")
        primary[f"CON_{j}"] = (fit.contrast.median, "subtracted contrast")
    header = {
        "BUNIT": science[0]["sci"].attrs.get("BUNIT", ""),
        **dict(grid.to_header()),
        **kl_keywords(reduction.parameters["truncate"]),
    }
    extensions = [Extension("SCI", da.asarray(i2d["sci"].data), header, i2d["sci"].dims)]
    return Product(output_dir / f"{name}_residual_i2d.fits", primary, extensions)


@dataclass
class ScratchForResidual:
    """What ``companions`` keeps of its reduction for the residual, as hidden scratch
    files of the folder (so that a run's products there stay as they are), placed with
    the other products and removed at the end (``remove``): each science exposure's
    crfints (``.companions_<name>``) and its aligned references (the scratch file KLIP
    reads, kept: placed under its name, then moved to ``.companions_<psfalign name>``)."""

    output_dir: Path
    names: tuple[list[str], list[str]]
    products: list[Product] = field(default_factory=list)
    written: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of(
        cls, reduction: Reduction, observation, output_dir: Path, wanted: bool = True
    ) -> "ScratchForResidual":
        """Mark the products of ``reduction`` to keep (before they are written); none
        unless ``wanted``."""
        kept = cls(Path(output_dir), product_names(observation))
        if not wanted:
            log.info("companions: no residual i2d (the run makes no i2d)")
            return kept
        adi = reduction.parameters["mode"] != "RDI"
        crfints, psfaligns = kept.names
        for item in reduction.products:
            if item.path.name in crfints:  # written by store tasks: renamed before
                kept.written[item.path.name] = item.path.with_name(f".companions_{item.path.name}")
                item.path = kept.written[item.path.name]
                kept.products.append(item)
            elif item.scratch and item.path.name.endswith("_aligned.fits"):
                item.scratch = False  # its path is KLIP's, read back as it is written
                kept.products.append(item)
            elif item.scratch and item.path.name.endswith(FITS) and adi:
                item.scratch = False  # align_refs' fits: ADI's injections move by them
                kept.products.append(item)
        aligned = [item for item in kept.products if item.path.name.endswith("_aligned.fits")]
        if len(aligned) != len(psfaligns):
            raise ValueError("companions: no aligned references kept for the residual")
        return kept

    def placed(self) -> None:
        """Move the aligned references placed to their hidden psfalign names."""
        _, psfaligns = self.names
        aligned = [item for item in self.products if item.path.name.endswith("_aligned.fits")]
        for item, name in zip(aligned, psfaligns if aligned else [], strict=True):
            self.written[name] = self.output_dir / f".companions_{name}"
            os.replace(item.path, self.written[name])
        fitted = [item for item in self.products if item.path.name.endswith(FITS)]
        for item, name in zip(fitted, psfaligns if fitted else [], strict=True):
            name = fits_name(name)
            self.written[name] = self.output_dir / f".companions_{name}"
            os.replace(item.path, self.written[name])

    def paths(self) -> list[Path]:
        """Every file kept, under any of its names."""
        return [item.path for item in self.products] + list(self.written.values())

    def remove(self) -> None:
        for path in self.paths():
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
