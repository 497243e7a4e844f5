"""calwebb_coron3 composed as a dask graph: association in, lazy JWST-named products out.

``build_products`` builds the graph of an association opened by ``open_association``
(``pipeline.observation``), nothing computed: crfints (outlier_detection), psfstack, per
science exposure psfalign and psfsub, and the i2d (resample), each with the record of how it
was made. ``reduce_observation``
builds the same and keeps the pieces more can be built on (the contrast curve's injections).
Running them is ``pipeline.run``'s.
"""

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import xarray as xr

from coron_dask.core.config import resolve_parameters
from coron_dask.io import Association, Extension, Product, open_exposure, read_psfmask, write_blocks
from coron_dask.kernels.klip import frame_means
from coron_dask.kernels.zones import Zones
from coron_dask.pipeline.observation import (
    Observation,
    exposure_root,
    find_psfmask,
    open_association,
    plan_observation,
)
from coron_dask.pipeline.provenance import provenance
from coron_dask.planning.block_plan import BlockPlan, Workers
from coron_dask.runtime.deploy import measure_workers
from coron_dask.steps.align_refs import align_models, alignment_table, median_replace_img
from coron_dask.steps.klip import KLBasis, kl_basis, subtract
from coron_dask.steps.klip_blocks import summary
from coron_dask.steps.klip_parameters import klip_zones, used_cutoffs, whole_frame
from coron_dask.steps.klip_selected import selected_basis
from coron_dask.steps.outlier_detection import outlier_detection
from coron_dask.steps.reference_choice import check_maxnumbasis, chooses, chosen_extensions
from coron_dask.steps.references import (
    eligible_references,
    exposure_references,
    fewest_references,
    reference_pool,
)
from coron_dask.steps.stack_refs import stack_refs

log = logging.getLogger(__name__)


def _extensions(dataset: xr.Dataset, sci_keywords: dict) -> list[Extension]:
    """SCI, ERR, DQ and WHT (those present) of ``dataset`` as product extensions, in order."""
    return [
        Extension(
            name.upper(),
            dataset[name].data,
            sci_keywords if name == "sci" else {},
            dataset[name].dims,
        )
        for name in ("sci", "err", "dq", "wht")
        if name in dataset
    ]


def kl_keywords(truncate: int | tuple[int, ...]) -> dict:
    """The SCI header's record of a KL-mode cube's cutoffs, as pyKLIP's: KLMODE0, KLMODE1,
    ... (none for one cutoff, jwst's layout)."""
    if isinstance(truncate, int):
        return {}
    return {
        f"KLMODE{i}": (k, f"KL modes of plane {i} of the kl axis") for i, k in enumerate(truncate)
    }


@dataclass
class Reduction:
    """A reduction built lazily (``reduce_observation``): its products and the pieces that
    more can be built on: per science exposure the flagged cube (crfints), KLIP's KL basis
    and the psfsub; the parameters as resolved and the block plan; per science exposure its
    psfalign (ADI's injections shift companions by its fits)."""

    products: list[Product]
    science: list[xr.Dataset]
    bases: list[KLBasis]
    psfsubs: list[xr.Dataset]
    parameters: dict
    plan: BlockPlan
    psfaligns: list[xr.Dataset] = field(default_factory=list)


def build_products(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    workers: Workers | None = None,
    opened: Observation | None = None,
    **parameters: object,
) -> list[Product]:
    """Build the lazy products of an association, in jwst's order: crfints (outlier_detection,
    every exposure), psfstack, psfalign and psfsub (each science exposure), i2d (resample).

    ``parameters`` are jwst's step parameters and a few of coron-dask's; those not given take
    the configured defaults (``core.parameters.SPEC``): skip (steps to skip: outlier_detection,
    resample), snr 5.0, maskpt 0.7, good_bits "~DO_NOT_USE", align_to "each",
    median_box_length 3, bad_bits "DO_NOT_USE" ("" for none), truncate 50, KLIP's zones
    (annuli 1, subsections 1, annuli_spacing "constant", iwa 0, owa None: one zone, the
    frame; ``steps.klip_parameters.klip_zones``), KLIP's references mode "RDI" (or "ADI",
    "ADI+RDI": the other rolls' integrations too) and movement 3.0 (pixels;
    ``steps.references``), maxnumbasis None (or K: the K eligible references most
    correlated with each integration in each zone; ``steps.reference_choice``),
    orientation "detector" (or "north"),
    format "fits" (or "zarr": Zarr stores), save_psfalign (True: write psfalign; without it
    only a scratch file of its SCI, which KLIP reads),
    integrations, psfs and outlier_rows (block sizes; planned for ``workers``, by default
    this process on this machine). Every product's primary keywords record how it was made
    (``provenance``: version, date, parameters, block plan, member exposures). ``opened``:
    the association as ``check_inputs`` opened it, planned with instead of opening it again.
    """
    return reduce_observation(
        asn, output_dir, psfmask=psfmask, workers=workers, opened=opened, **parameters
    ).products


@dataclass
class _Products:
    """The products of a reduction as they are built, each primary header with the record of
    how it was made (``provenance``: the same DATE for every product of a run)."""

    output_dir: Path
    parameters: dict
    plan: BlockPlan
    association: Association
    psfmask: Path | None
    made: datetime = field(default_factory=lambda: datetime.now(UTC))
    products: list[Product] = field(default_factory=list)

    def add(
        self,
        name: str,
        keywords: dict,
        dataset: xr.Dataset,
        sci_keywords: dict,
        steps: tuple[str, ...],
        science: tuple[str | Path, ...] = (),
        psf: tuple[str | Path, ...] = (),
    ) -> Product:
        """Add a product made by ``steps`` from the ``science`` and ``psf`` exposures."""
        filename = f"{name}.{self.parameters['format']}"
        record = provenance(
            self.parameters,
            self.plan,
            science,
            psf,
            steps=steps,
            asn=self.association.path,
            psfmask=self.psfmask,
            date=self.made,
        )
        primary = {**keywords, **record, "FILENAME": filename}
        product = Product(self.output_dir / filename, primary, _extensions(dataset, sci_keywords))
        self.products.append(product)
        return product

    def scratch(self, name: str, dataset: xr.Dataset, names: tuple[str, ...]) -> Product:
        """A scratch file (FITS) holding ``names`` of ``dataset``, removed once the run ends."""
        extensions = [Extension(item, dataset[item.lower()].data) for item in names]
        kept = Product(self.output_dir / f"{name}.fits", {}, extensions, scratch=True)
        self.products.append(kept)
        return kept


def _crfints(
    observation: Observation, made: _Products
) -> tuple[list[xr.Dataset], list[xr.Dataset]]:
    """outlier_detection of every exposure, in slabs of the plan's rows: the science and
    reference exposures flagged, each written as a crfints."""
    p, rows, asn_id = made.parameters, made.plan.outlier_rows, made.association.asn_id

    def flag(exposure: xr.Dataset) -> xr.Dataset:
        slabs = open_exposure(exposure.encoding["source"], {"integration": -1, "y": rows})
        flagged = outlier_detection(exposure, p["snr"], p["maskpt"], p["good_bits"], slabs=slabs)
        flagged.encoding.update(exposure.encoding)
        return flagged

    psf = [flag(exposure) for exposure in observation.psf]
    science = [flag(exposure) for exposure in observation.science]
    for exptype, exposure in [*(("psf", e) for e in psf), *(("science", e) for e in science)]:
        made.add(
            f"{exposure_root(exposure)}_{asn_id}_crfints",
            {**exposure.attrs, "DATAMODL": "CubeModel"},
            exposure,
            exposure["sci"].attrs,
            ("outlier_detection",),
            **{exptype: (exposure.encoding["source"],)},
        )
    return science, psf


def _alignment_mask(psfmask: Path | None, stack: xr.Dataset) -> object:
    """align_refs' weights: the PSFMASK read for the frames, or None (every pixel 1)."""
    if psfmask:
        log.info("align_refs: PSFMASK %s", psfmask)
        return read_psfmask(psfmask, (stack.sizes["y"], stack.sizes["x"]))
    log.warning(
        "align_refs: no PSFMASK (--psfmask none): every pixel weighs 1 in the alignment "
        "fit, where jwst weighs them with the PSFMASK reference file of the coronagraph"
    )
    return None


def _filled_references(
    stack: xr.Dataset, filled: list[xr.Dataset], made: _Products
) -> tuple[xr.Dataset, dict]:
    """Every frame a science integration may take as a reference (``--mode``: the
    reference star's, the ``filled`` science exposures', or both) with bad pixels filled,
    and where they go to disk once (a scratch file; each alignment task reads its block
    from it)."""
    p = made.parameters
    refs = median_replace_img(stack, p["median_box_length"], p["bad_bits"])
    refs = reference_pool(refs, filled, p["mode"])
    names = ("SCI", "ERR") if p["save_psfalign"] else ("SCI",)
    kept = made.scratch(f"{made.association.product_name}_refs", refs, names)
    return refs, {name.lower(): write_blocks(name, kept, summary=frame_means) for name in names}


def _psfsub(
    exposure: xr.Dataset,
    filled: xr.Dataset,
    stack: xr.Dataset,
    refs: xr.Dataset,
    mask: object,
    on_disk: dict,
    made: _Products,
) -> tuple[xr.Dataset, KLBasis, xr.Dataset]:
    """align_refs and klip of one science exposure: its psfalign (the references aligned to
    it) and psfsub, the KL basis they were subtracted on, and psfalign. ``refs``: the pool of
    references (``steps.references.reference_pool``), of which the exposure takes those
    of its mode (ADI: the other rolls')."""
    p, plan, association = made.parameters, made.plan, made.association
    refs, places, roll = exposure_references(refs, exposure, p["mode"], plan.psfs)
    psfalign = align_models(
        filled, refs, mask, align_to=p["align_to"], on_disk=on_disk, psfs=plan.psfs, places=places
    )
    root = f"{exposure_root(exposure)}_{association.asn_id}"
    model = "QuadModel" if p["align_to"] == "each" else "CubeModel"
    members = {"science": (exposure.encoding["source"],), "psf": association.psf}
    aligned_in = []  # where the aligned SCI is written, KLIP reading it from the first
    if p["save_psfalign"]:
        kept = made.add(
            f"{root}_psfalign",
            {**stack.attrs, "DATAMODL": model},
            psfalign[["sci", "err"]],
            stack["sci"].attrs,
            ("outlier_detection", "stack_refs", "align_refs"),
            **members,
        )
        kept.extensions.append(alignment_table(psfalign))  # ALIGN: the fits
        aligned_in.append(kept)
    if not p["save_psfalign"] or p["format"] == "zarr":  # KLIP reads a FITS file
        aligned_in.insert(0, made.scratch(f"{root}_aligned", psfalign, ("SCI",)))
    # the fitted shifts, block by block: a run taken up reads back those of the blocks
    # fitted before instead of fitting them again (the ALIGN tables need every fit)
    made.scratch(f"{root}_fits", psfalign, ("FIT",))  # shift and converged both read it
    # each block written by the task that shifts it, handing on its frames' means over
    # each of KLIP's zones; KLIP reads it back a tile at a time
    zones = exposure_zones(exposure, p)
    aligned = write_blocks("SCI", *aligned_in, summary=summary(zones), values=zones and zones.count)
    eligible = None  # where each reference may be used: ADI's movement (RDI: everywhere)
    if roll is not None:
        source = Path(exposure.encoding.get("source", "science")).name
        chunks = filled["sci"].data.chunks[0]
        eligible = eligible_references(psfalign, roll, zones, p["movement"], chunks, source=source)
    klipping = dict(rows=plan.klip_rows, on_disk=aligned, zones=zones)
    chosen = None  # of the eligible, the maxnumbasis most correlated per integration and zone
    if chooses(p["maxnumbasis"], psfalign.sizes["psf"]):
        basis, *chosen = selected_basis(
            filled, psfalign, p["truncate"], p["maxnumbasis"], eligible=eligible, **klipping
        )
    else:  # every eligible reference
        alike = None if eligible is None else eligible[:1]  # the same for every integration
        basis = kl_basis(filled, psfalign, p["truncate"], chosen=alike, **klipping)
    psfsub = subtract(filled, basis)
    product = made.add(
        f"{root}_psfsub",
        {**exposure.attrs, "DATAMODL": "CubeModel"},
        psfsub,
        {**exposure["sci"].attrs, **kl_keywords(p["truncate"])},
        ("outlier_detection", "align_refs", "klip"),
        **members,
    )
    product.extensions.append(alignment_table(psfalign))
    if chosen is not None:
        product.extensions.extend(chosen_extensions(*chosen))
    return psfsub, basis, psfalign


def exposure_zones(exposure: xr.Dataset, p: dict, *, logged: bool = True) -> Zones | None:
    """KLIP's zones in ``exposure`` (None: one, the whole frame) for parameters ``p``, about
    the star's pixel on its detector: TARG_RA, TARG_DEC through the SCI header's celestial
    WCS (``logged``). Raises CoronInputError where the parameters make none."""
    names = ("annuli", "subsections", "iwa", "owa")
    if whole_frame(*(p[name] for name in names)):
        return None
    # astropy's WCS and coordinates: only for KLIP in zones
    from coron_dask.science.geometry import pixel_positions, sky_wcs, star_position

    source = Path(exposure.encoding.get("source", "science")).name
    x, y = pixel_positions(sky_wcs(exposure), star_position(exposure.attrs, source))[0]
    if logged:
        log.info(
            "klip: the star of %s at (x, y) = (%.2f, %.2f) px (TARG_RA, TARG_DEC, WCS)",
            source,
            x,
            y,
        )
    shape = (exposure.sizes["y"], exposure.sizes["x"])
    zoning = {name: p[name] for name in (*names, "annuli_spacing")}
    return klip_zones(shape, (float(x), float(y)), source=source, logged=logged, **zoning)


def _i2d(psfsubs: list[xr.Dataset], science: list[xr.Dataset], made: _Products) -> None:
    """resample of every psfsub onto one sky grid: the i2d."""
    from coron_dask.steps.resample import resample  # astropy.wcs: only for an i2d

    p, association = made.parameters, made.association
    i2d, grid = resample(psfsubs, science, orientation=p["orientation"])
    made.add(
        f"{association.product_name}_i2d",
        {**science[0].attrs, "DATAMODL": "ImageModel"},
        i2d,
        {
            "BUNIT": science[0]["sci"].attrs.get("BUNIT", ""),
            **dict(grid.to_header()),
            **kl_keywords(p["truncate"]),
        },
        ("outlier_detection", "align_refs", "klip", "resample"),
        science=association.science,
        psf=association.psf,
    )


def reduce_observation(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    workers: Workers | None = None,
    injections: int = 0,
    windows: tuple = (0, (0, 0)),
    opened: Observation | None = None,
    **parameters: object,
) -> Reduction:
    """``build_products``, with what was built on the way (``Reduction``); the block plan
    makes room for ``injections``, sets of companions subtracted on the same bases
    (``contrast``), and for ``windows`` (n, (wy, wx)) of KL images (``companions``)."""
    p = resolve_parameters(**parameters)
    psfmask = find_psfmask(asn, psfmask)
    psfmask = None if psfmask == "none" else psfmask
    opened = opened or open_association(asn)
    # klip keeps at most as many KL modes as there are references: its products say so
    npsf = fewest_references(opened.science, opened.psfstack.sizes["psf"], p["mode"])
    check_maxnumbasis(p["maxnumbasis"], p["truncate"], npsf)
    p["truncate"] = used_cutoffs(p["truncate"], npsf)
    plan = plan_observation(opened, workers or measure_workers(None), p, injections, windows)
    log.info("block plan: %s", plan.describe())
    # references in blocks of at most `psfs`, none across exposures: an alignment task reads one
    observation = open_association(asn, plan.integrations, plan.psfs)
    made = _Products(Path(output_dir), p, plan, observation.association, psfmask)
    if "outlier_detection" in p["skip"]:
        log.info("outlier_detection skipped")
        science, psf = observation.science, observation.psf
    else:
        science, psf = _crfints(observation, made)
    stack = stack_refs(psf)
    mask = _alignment_mask(psfmask, stack)
    made.add(
        f"{made.association.product_name}_psfstack",
        {**stack.attrs, "DATAMODL": "CubeModel"},
        stack,
        stack["sci"].attrs,
        ("outlier_detection", "stack_refs"),
        psf=made.association.psf,
    )
    filled = [median_replace_img(e, p["median_box_length"], p["bad_bits"]) for e in science]
    refs, on_disk = _filled_references(stack, filled, made)
    psfsubs, bases, psfaligns = [], [], []
    for exposure, filled_exposure in zip(science, filled, strict=True):
        psfsub, basis, psfalign = _psfsub(
            exposure, filled_exposure, stack, refs, mask, on_disk, made
        )
        psfsubs.append(psfsub)
        bases.append(basis)
        psfaligns.append(psfalign)
    if not p["save_psfalign"]:
        log.info("psfalign not written: the aligned references go to a scratch file KLIP reads")
    if "resample" in p["skip"]:
        log.info("resample skipped")
    else:
        _i2d(psfsubs, science, made)
    return Reduction(made.products, science, bases, psfsubs, p, plan, psfaligns)
