"""calwebb_coron3 on dask: association in, JWST-named products out, in one computation.

``open_association`` reads and checks headers only; ``build_products`` builds the graph
(nothing computed); ``run_coron3`` checks the input, connects to a cluster, plans blocks
for its workers' memory and writes the products.
"""

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import xarray as xr
from dask.utils import parse_bytes

from coron_dask.core import config
from coron_dask.core.dqflags import bit_value
from coron_dask.core.errors import CoronInputError
from coron_dask.io import (
    Association,
    Extension,
    Product,
    open_exposure,
    read_association,
    read_psfmask,
    write_blocks,
    write_products,
)
from coron_dask.pipeline.provenance import provenance
from coron_dask.planning import block_plan as chunking
from coron_dask.planning.block_plan import BlockPlan, Workers
from coron_dask.runtime.deploy import Cluster, in_process, measure_workers
from coron_dask.runtime.execute import execute
from coron_dask.steps import align_models, median_replace_img, outlier_detection, stack_refs
from coron_dask.steps.align_refs import alignment_table
from coron_dask.steps.klip import KLBasis, kl_basis, kl_cutoffs, subtract


@dataclass
class Observation:
    """An association opened lazily: science exposures and the reference stack."""

    association: Association
    science: list[xr.Dataset]
    psf: list[xr.Dataset]
    psfstack: xr.Dataset


def exposure_root(dataset: xr.Dataset) -> str:
    """The file name without its ``_calints.fits`` (or other ``_suffix.fits``) ending."""
    name = Path(dataset.encoding["source"]).name
    stem = name.removesuffix(".fits")
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


log = logging.getLogger(__name__)


def _stack(psf: list[xr.Dataset], psfs: int | None) -> xr.Dataset:
    """stack_refs of ``psf``, in blocks of ``psfs`` references (None: one block)."""
    stack = stack_refs(psf)
    return stack if psfs is None else stack.chunk({"psf": psfs})


def open_association(
    asn: str | Path, integrations: int | None = None, psfs: int | None = None
) -> Observation:
    """Open an association lazily, checking every member's header and frame size.

    Science exposures are chunked by ``integrations``, the reference stack by ``psfs``
    frames (default: whole exposures, and the whole stack).
    """
    association = read_association(asn)
    psf = [open_exposure(path, {"integration": psfs}) for path in association.psf]
    psfstack = _stack(psf, psfs)
    frame = (psfstack.sizes["y"], psfstack.sizes["x"])
    science = []
    for path in association.science:
        exposure = open_exposure(path, {"integration": integrations})
        if (exposure.sizes["y"], exposure.sizes["x"]) != frame:
            raise CoronInputError(
                path,
                f"frames are {exposure.sizes['y']}x{exposure.sizes['x']} pixels, "
                f"the PSF frames {frame[0]}x{frame[1]}",
            )
        science.append(exposure)
    return Observation(association, science, psf, psfstack)


def plan_observation(
    observation: Observation,
    workers: Workers,
    parameters: dict | None = None,
    injections: int = 0,
) -> BlockPlan:
    """Blocks for ``observation`` on ``workers`` (parameters: those of ``build_products``,
    resolved; blocks given there are kept; ``injections``: sets of companions subtracted on
    the same bases), with the settings under coron_dask.chunks."""
    p = parameters or resolve_parameters()
    sizes = chunking.Observation(
        science_nints=tuple(e.sizes["integration"] for e in observation.science),
        psf_nints=tuple(e.sizes["integration"] for e in observation.psf),
        frame=(observation.psfstack.sizes["y"], observation.psfstack.sizes["x"]),
        truncate=p["truncate"],
        align_to=p["align_to"],
        save_psfalign=p["save_psfalign"],
        format=p["format"],
        injections=injections,
    )
    return chunking.plan_blocks(
        sizes,
        workers,
        fraction=float(config.get("chunks.memory-fraction")),
        tile_bytes=parse_bytes(config.get("chunks.klip-tile")),
        integrations=p["integrations"],
        psfs=p["psfs"],
        outlier_rows=p["outlier_rows"],
    )


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


#: Steps that can be skipped, as in jwst.
SKIPPABLE = ("outlier_detection", "resample")
#: Parameters whose default (None) is read from coron-dask's configuration.
CONFIGURED = {
    "skip": "skip",
    "snr": "outlier_detection.snr",
    "maskpt": "outlier_detection.maskpt",
    "good_bits": "outlier_detection.good-bits",
    "align_to": "align_refs.align-to",
    "median_box_length": "align_refs.median-box-length",
    "bad_bits": "align_refs.bad-bits",
    "truncate": "klip.truncate",
    "orientation": "resample.orientation",
    "format": "output.format",
    "save_psfalign": "output.psfalign",
    "integrations": "chunks.integrations",
    "psfs": "chunks.psfs",
    "outlier_rows": "chunks.outlier-rows",
}


def truncation(truncate: object) -> int | tuple[int, ...]:
    """klip's truncate as given (an int, a sequence or a text such as "5,10,20,50"): one
    cutoff as an int (jwst's psfsub), several as a KL-mode cube's ascending cutoffs."""
    if isinstance(truncate, str):
        try:
            truncate = [int(value) for value in truncate.split(",") if value.strip()]
        except ValueError:
            raise CoronInputError(
                "truncate", f"must be whole numbers separated by commas, got {truncate!r}"
            ) from None
    cutoffs = kl_cutoffs(truncate)
    return cutoffs[0] if len(cutoffs) == 1 else cutoffs


def kl_keywords(truncate: int | tuple[int, ...]) -> dict:
    """The SCI header's record of a KL-mode cube's cutoffs, as pyKLIP's: KLMODE0, KLMODE1,
    ... (none for one cutoff, jwst's layout)."""
    if isinstance(truncate, int):
        return {}
    return {
        f"KLMODE{i}": (k, f"KL modes of plane {i} of the kl axis") for i, k in enumerate(truncate)
    }


def resolve_parameters(**given: object) -> dict:
    """Step and output parameters with None replaced by the configured defaults, checked."""
    unknown = set(given) - set(CONFIGURED)
    if unknown:
        raise TypeError(f"unexpected parameters {sorted(unknown)}")
    resolved = {
        name: config.get(key) if given.get(name) is None else given[name]
        for name, key in CONFIGURED.items()
    }
    resolved["truncate"] = truncation(resolved["truncate"])
    if resolved["median_box_length"] < 0:
        raise CoronInputError(
            "median_box_length", f"must be >= 0, got {resolved['median_box_length']}"
        )
    for name in ("integrations", "psfs", "outlier_rows"):
        if resolved[name] is not None and resolved[name] < 1:
            raise CoronInputError(name, f"must be >= 1, got {resolved[name]}")
    if resolved["align_to"] not in ("each", "first"):
        raise CoronInputError(
            "align_to", f"must be 'each' or 'first', got {resolved['align_to']!r}"
        )
    if resolved["format"] not in ("fits", "zarr"):
        raise CoronInputError("format", f"must be 'fits' or 'zarr', got {resolved['format']!r}")
    bit_value(resolved["bad_bits"])  # names it cannot read are bad input too
    bit_value(resolved["good_bits"], "good_bits")
    skip = resolved["skip"] or ()
    resolved["skip"] = (skip,) if isinstance(skip, str) else tuple(skip)
    unknown_steps = set(resolved["skip"]) - set(SKIPPABLE)
    if unknown_steps:
        raise CoronInputError("skip", f"steps {sorted(unknown_steps)} cannot be skipped")
    if resolved["orientation"] not in ("detector", "north"):
        raise CoronInputError(
            "orientation", f"must be 'detector' or 'north', got {resolved['orientation']!r}"
        )
    return resolved


@dataclass
class Reduction:
    """A reduction built lazily (``reduce_observation``): its products and the pieces that
    more can be built on: per science exposure the flagged cube (crfints), KLIP's KL basis
    and the psfsub; the parameters as resolved and the block plan."""

    products: list[Product]
    science: list[xr.Dataset]
    bases: list[KLBasis]
    psfsubs: list[xr.Dataset]
    parameters: dict
    plan: BlockPlan


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
    the configured defaults (``coron_dask.yaml``): skip (steps to skip: outlier_detection,
    resample), snr 5.0, maskpt 0.7, good_bits "~DO_NOT_USE", align_to "each",
    median_box_length 3, bad_bits "DO_NOT_USE" ("" for none), truncate 50, orientation
    "detector" (or "north"), format "fits" (or "zarr": Zarr stores), save_psfalign (True:
    write psfalign; without it only a scratch file of its SCI, which KLIP reads),
    integrations, psfs and outlier_rows (block sizes; planned for ``workers``, by default
    this process on this machine). Every product's primary keywords record how it was made
    (``provenance``: version, date, parameters, block plan, member exposures). ``opened``:
    the association as ``check_inputs`` opened it, planned with instead of opening it again.
    """
    return reduce_observation(
        asn, output_dir, psfmask=psfmask, workers=workers, opened=opened, **parameters
    ).products


def reduce_observation(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    workers: Workers | None = None,
    injections: int = 0,
    opened: Observation | None = None,
    **parameters: object,
) -> Reduction:
    """``build_products``, with what was built on the way (``Reduction``); ``injections``:
    sets of companions that will be subtracted on the same bases, which the block plan
    makes room for (``contrast``)."""
    p = resolve_parameters(**parameters)
    psfmask = find_psfmask(asn, psfmask)
    psfmask = None if psfmask == "none" else psfmask
    plan = plan_observation(
        opened or open_association(asn), workers or measure_workers(None), p, injections
    )
    log.info("block plan: %s", plan.describe())
    integrations, psfs = plan.integrations, plan.psfs
    observation = open_association(asn, integrations, psfs)
    association = observation.association
    output_dir, suffix = Path(output_dir), p["format"]
    made = datetime.now(UTC)  # every product of a run has the same DATE
    products: list[Product] = []

    def product(
        name: str,
        keywords: dict,
        dataset: xr.Dataset,
        sci_keywords: dict,
        steps: tuple[str, ...],
        science: tuple[str | Path, ...] = (),
        psf: tuple[str | Path, ...] = (),
    ) -> None:
        """Add a product made by ``steps`` from the ``science`` and ``psf`` exposures,
        with the record of how it was made (``provenance``)."""
        filename = f"{name}.{suffix}"
        record = provenance(
            p, plan, science, psf, steps=steps, asn=association.path, psfmask=psfmask, date=made
        )
        primary = {**keywords, **record, "FILENAME": filename}
        products.append(Product(output_dir / filename, primary, _extensions(dataset, sci_keywords)))

    def scratch(name: str, dataset: xr.Dataset, names: tuple[str, ...]) -> Product:
        """A scratch file (FITS) holding ``names`` of ``dataset``, removed once the run ends."""
        extensions = [Extension(item, dataset[item.lower()].data) for item in names]
        kept = Product(output_dir / f"{name}.fits", {}, extensions, scratch=True)
        products.append(kept)
        return kept

    # the references in their exposures' blocks of at most `psfs` (no block merges
    # pieces of several): each alignment task reads its `psfs` references from disk
    science, stack = observation.science, stack_refs(observation.psf)
    if "outlier_detection" in p["skip"]:
        log.info("outlier_detection skipped")
    else:

        def flag(exposure: xr.Dataset) -> xr.Dataset:
            slabs = open_exposure(
                exposure.encoding["source"], {"integration": -1, "y": plan.outlier_rows}
            )
            flagged = outlier_detection(
                exposure, p["snr"], p["maskpt"], p["good_bits"], slabs=slabs
            )
            flagged.encoding.update(exposure.encoding)
            return flagged

        psf = [flag(exposure) for exposure in observation.psf]
        science = [flag(exposure) for exposure in science]
        for exptype, exposure in [*(("psf", e) for e in psf), *(("science", e) for e in science)]:
            product(
                f"{exposure_root(exposure)}_{association.asn_id}_crfints",
                {**exposure.attrs, "DATAMODL": "CubeModel"},
                exposure,
                exposure["sci"].attrs,
                ("outlier_detection",),
                **{exptype: (exposure.encoding["source"],)},
            )
        stack = stack_refs(psf)
    mask = read_psfmask(psfmask, (stack.sizes["y"], stack.sizes["x"])) if psfmask else None
    if psfmask:
        log.info("align_refs: PSFMASK %s", psfmask)
    else:
        log.warning(
            "align_refs: no PSFMASK (--psfmask none): every pixel weighs 1 in the alignment "
            "fit, where jwst weighs them with the PSFMASK reference file of the coronagraph"
        )
    stack_keywords = stack.attrs
    product(
        f"{association.product_name}_psfstack",
        {**stack_keywords, "DATAMODL": "CubeModel"},
        stack,
        stack["sci"].attrs,
        ("outlier_detection", "stack_refs"),
        psf=association.psf,
    )
    # the filled references go to disk once; each alignment task reads its block
    refs = median_replace_img(stack, p["median_box_length"], p["bad_bits"])
    names = ("SCI", "ERR") if p["save_psfalign"] else ("SCI",)
    kept = scratch(f"{association.product_name}_refs", refs, names)
    on_disk = {name.lower(): write_blocks(name, kept) for name in names}
    psfsubs, bases = [], []
    for exposure in science:
        filled = median_replace_img(exposure, p["median_box_length"], p["bad_bits"])
        psfalign = align_models(
            filled, refs, mask, align_to=p["align_to"], on_disk=on_disk, psfs=psfs
        )
        root = f"{exposure_root(exposure)}_{association.asn_id}"
        model = "QuadModel" if p["align_to"] == "each" else "CubeModel"
        # psfalign and psfsub: the references, aligned to this science exposure
        members = {"science": (exposure.encoding["source"],), "psf": association.psf}
        aligned_in = []  # where the aligned SCI is written, KLIP reading it from the first
        if p["save_psfalign"]:
            product(
                f"{root}_psfalign",
                {**stack_keywords, "DATAMODL": model},
                psfalign[["sci", "err"]],
                stack["sci"].attrs,
                ("outlier_detection", "stack_refs", "align_refs"),
                **members,
            )
            products[-1].extensions.append(alignment_table(psfalign))  # ALIGN: the fits
            aligned_in.append(products[-1])
        if not p["save_psfalign"] or suffix == "zarr":  # KLIP reads a FITS file
            aligned_in.insert(0, scratch(f"{root}_aligned", psfalign, ("SCI",)))
        # each block written by the task that shifts it; KLIP reads it back a tile at a time
        aligned = write_blocks("SCI", *aligned_in)
        basis = kl_basis(filled, psfalign, p["truncate"], rows=plan.klip_rows, on_disk=aligned)
        psfsub = subtract(filled, basis)
        psfsubs.append(psfsub)
        bases.append(basis)
        product(
            f"{root}_psfsub",
            {**exposure.attrs, "DATAMODL": "CubeModel"},
            psfsub,
            {**exposure["sci"].attrs, **kl_keywords(p["truncate"])},
            ("outlier_detection", "align_refs", "klip"),
            **members,
        )
        products[-1].extensions.append(alignment_table(psfalign))
    if not p["save_psfalign"]:
        log.info("psfalign not written: the aligned references go to a scratch file KLIP reads")
    if "resample" in p["skip"]:
        log.info("resample skipped")
    else:
        from coron_dask.steps.resample import resample  # astropy.wcs: only for an i2d

        i2d, grid = resample(psfsubs, science, orientation=p["orientation"])
        product(
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
    return Reduction(products, science, bases, psfsubs, p, plan)


#: --psfmask's words: the PSFMASK CRDS gives (jwst's), or none (every pixel weighs 1)
PSFMASK_CHOICES = ("crds", "none")


def find_psfmask(asn: str | Path, psfmask: str | Path | None = None) -> Path | str:
    """The PSFMASK of align_refs: ``psfmask`` if it names a file; from CRDS for the first
    science exposure's header, as jwst finds it, for "crds" (the default, the setting
    ``coron_dask.align_refs.psfmask``); "none" for none (every pixel weighs 1 in the
    alignment fit). Raises CoronInputError, in one line, where CRDS has none for it or
    cannot be reached."""
    from coron_dask.io.reference_files import best_psfmask

    choice = psfmask if psfmask is not None else config.get("align_refs.psfmask")
    choice = "none" if choice is None else choice  # dask's configuration reads none as null
    if str(choice).lower() not in PSFMASK_CHOICES:
        return Path(choice)
    if str(choice).lower() == "none":
        return "none"
    science = read_association(asn).science[0]
    found = best_psfmask(science, open_exposure(science).attrs)
    log.info("align_refs: PSFMASK %s from CRDS, for %s", found.name, Path(science).name)
    return found


def check_output_dir(output_dir: str | Path) -> None:
    """Raise CoronInputError unless products can be written in ``output_dir``: a folder, or
    one that can be made, that this process may write in."""
    path = Path(output_dir).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise CoronInputError(existing, "is a file: products go in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CoronInputError(existing, "is not writable")


def check_inputs(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    **parameters: object,
) -> tuple[dict, Observation]:
    """Check a run's input before any cluster starts: parameters, every member's header and
    frame size, the PSFMASK, the output folder. Returns the parameters resolved and the
    observation opened (whole exposures)."""
    resolved = resolve_parameters(**parameters)
    observation = open_association(asn)
    if psfmask is not None and str(psfmask).lower() not in PSFMASK_CHOICES:
        frame = observation.psfstack
        read_psfmask(psfmask, (frame.sizes["y"], frame.sizes["x"]))
    check_output_dir(output_dir)
    return resolved, observation


def execute_on_cluster(
    build,
    *,
    progress: bool = True,
    report: str | Path | None = None,
    stats: str | Path | None = None,
    cluster: Cluster | None = None,
    client: object | None = None,
    data_bytes: int | None = None,
    **where: object,
) -> list[Path]:
    """Connect to (or start) the cluster ``where`` describes (``cluster.Cluster``'s
    arguments: scheduler, scheduler_file, n_workers, memory_limit, kind, jobs, adapt,
    wait_for_workers, quiet; or a ``cluster`` under way, or a distributed ``client`` you
    have, which is used and left open), build the products with ``build(workers)`` for its
    workers and write them in one computation (``progress``, ``report``, ``stats``: see
    ``run_coron3``): their paths. A run of ``data_bytes`` (``observation_bytes``) that asks for no
    cluster may compute in this process (``cluster.in_process``)."""
    with contextlib.ExitStack() as resources:
        if client is None:
            if cluster is None:
                if in_process(data_bytes, report=report, **where):
                    where = {**where, "scheduler": "threads"}
                cluster = resources.enter_context(Cluster(**where))
            client = cluster.client
        if report and client is None:
            raise CoronInputError(
                "report", "needs a distributed cluster, not dask's local schedulers"
            )
        workers = measure_workers(client)
        log.info("workers: %s", workers.describe())
        products = build(workers)
        return write_products(
            products,
            lambda *writes: execute(writes, client, progress=progress, report=report, stats=stats),
        )


def observation_bytes(observation: Observation, align_to: str) -> int:
    """What a run of ``observation`` reads and aligns: its exposures' SCI, ERR and DQ, and
    the aligned references' SCI and ERR (psfalign, kept or as a scratch file), in bytes."""
    inputs = sum(
        dataset[name].nbytes
        for dataset in (*observation.science, *observation.psf)
        for name in ("sci", "err", "dq")
        if name in dataset
    )
    targets = sum(
        dataset.sizes["integration"] if align_to == "each" else 1 for dataset in observation.science
    )
    frame = observation.psfstack.sizes["y"] * observation.psfstack.sizes["x"]
    return int(inputs + 2 * 4 * targets * observation.psfstack.sizes["psf"] * frame)


def run_coron3(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    memory_limit: str | float | None = None,
    kind: str = "local",
    jobs: int | None = None,
    adapt: tuple[int, int] | None = None,
    wait_for_workers: int | None = None,
    progress: bool = True,
    quiet: bool = False,
    report: str | Path | None = None,
    stats: str | Path | None = None,
    cluster: Cluster | None = None,
    client: object | None = None,
    **parameters: object,
) -> list[Path]:
    """Run calwebb_coron3 on an association and return the paths of the products written.

    ``parameters`` are those of ``build_products`` (skip, snr, maskpt, good_bits, align_to,
    median_box_length, bad_bits, truncate, orientation, format, save_psfalign, integrations,
    psfs, outlier_rows), the
    configured defaults where not given. ``scheduler``: None starts a LocalCluster of
    ``n_workers`` processes for the run (or, with ``kind`` "slurm" or "pbs", ``jobs`` batch
    jobs of workers, or between the ``adapt`` minimum and maximum); an address or
    ``scheduler_file`` uses a running cluster, once ``wait_for_workers`` workers joined;
    ``"synchronous"`` or ``"threads"`` use dask's local schedulers; a ``cluster`` already
    under way (``cluster.Cluster``) is used as it is, and so is a distributed ``client``
    you already have (a notebook's), which the run leaves open. The input is checked before
    the cluster computes anything, so bad input fails fast and leaves no product. ``report`` saves
    dask's performance report (HTML), ``stats`` a JSON summary of where the time went. With
    an i2d, the run ends with its detection map and candidates (``detection.detect``).
    """
    psfmask = find_psfmask(asn, psfmask)  # before any cluster starts, as the input checks
    parameters, observation = check_inputs(asn, output_dir, psfmask=psfmask, **parameters)
    paths = execute_on_cluster(
        lambda workers: build_products(
            asn, output_dir, psfmask=psfmask, workers=workers, opened=observation, **parameters
        ),
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        n_workers=n_workers,
        memory_limit=memory_limit,
        kind=kind,
        jobs=jobs,
        adapt=adapt,
        wait_for_workers=wait_for_workers,
        progress=progress,
        quiet=quiet,
        report=report,
        stats=stats,
        cluster=cluster,
        client=client,
        data_bytes=observation_bytes(observation, parameters["align_to"]),
    )
    if "resample" in parameters["skip"]:
        return paths
    from coron_dask.science.detection import detection_products  # astropy.table: only with an i2d

    return [*paths, *detection_products(paths)]
