"""calwebb_coron3 on dask: association in, JWST-named products out, in one computation.

``open_association`` reads and checks headers only; ``build_products`` builds the graph
(nothing computed); ``run_coron3`` checks the input, connects to a cluster, plans blocks
for its workers' memory and writes the products.
"""

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import xarray as xr

from coron_dask import config
from coron_dask.chunking import ChunkPlan, plan_chunks
from coron_dask.cluster import Cluster, execute, task_memory
from coron_dask.dqflags import bit_value
from coron_dask.errors import CoronInputError
from coron_dask.io import (
    Association,
    Extension,
    Product,
    open_exposure,
    read_association,
    read_psfmask,
    write_products,
)
from coron_dask.steps import align_refs, klip, stack_refs
from coron_dask.steps.align_refs import AlignTo

Format = Literal["fits", "zarr"]


@dataclass
class Observation:
    """An association opened lazily: science exposures and the reference stack."""

    association: Association
    science: list[xr.Dataset]
    psfstack: xr.Dataset


def exposure_root(dataset: xr.Dataset) -> str:
    """The file name without its ``_calints.fits`` (or other ``_suffix.fits``) ending."""
    name = Path(dataset.encoding["source"]).name
    stem = name.removesuffix(".fits")
    return stem.rsplit("_", 1)[0] if "_" in stem else stem


def open_association(
    asn: str | Path, integrations: int | None = None, psfs: int | None = None
) -> Observation:
    """Open an association lazily, checking every member's header and frame size.

    Science exposures are chunked by ``integrations``, the reference stack by ``psfs``
    frames (default: whole exposures, and the whole stack).
    """
    association = read_association(asn)
    psfstack = stack_refs([open_exposure(path, psfs) for path in association.psf])
    if psfs is not None:
        psfstack = psfstack.chunk({"psf": psfs})
    frame = (psfstack.sizes["y"], psfstack.sizes["x"])
    science = []
    for path in association.science:
        exposure = open_exposure(path, integrations)
        if (exposure.sizes["y"], exposure.sizes["x"]) != frame:
            raise CoronInputError(
                path,
                f"frames are {exposure.sizes['y']}x{exposure.sizes['x']} pixels, "
                f"the PSF frames {frame[0]}x{frame[1]}",
            )
        science.append(exposure)
    return Observation(association, science, psfstack)


def plan_observation(
    observation: Observation, task_memory: int, workers: int, truncate: int = 50
) -> ChunkPlan:
    """Blocks for ``observation`` on workers with ``task_memory`` bytes per thread."""
    stack = observation.psfstack
    return plan_chunks(
        nints=[exposure.sizes["integration"] for exposure in observation.science],
        npsf=stack.sizes["psf"],
        frame=(stack.sizes["y"], stack.sizes["x"]),
        task_memory=task_memory,
        workers=workers,
        truncate=truncate,
    )


def _extensions(dataset: xr.Dataset, sci_keywords: dict) -> list[Extension]:
    """SCI, ERR and DQ (those present) of ``dataset`` as product extensions, in that order."""
    return [
        Extension(
            name.upper(),
            dataset[name].data,
            sci_keywords if name == "sci" else {},
            dataset[name].dims,
        )
        for name in ("sci", "err", "dq")
        if name in dataset
    ]


#: Parameters whose default (None) is read from coron-dask's configuration.
CONFIGURED = {
    "align_to": "align_refs.align-to",
    "median_box_length": "align_refs.median-box-length",
    "bad_bits": "align_refs.bad-bits",
    "truncate": "klip.truncate",
    "format": "output.format",
    "integrations": "chunks.integrations",
    "psfs": "chunks.psfs",
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
    for name in ("truncate", "median_box_length"):
        if resolved[name] < 0:
            raise CoronInputError(name, f"must be >= 0, got {resolved[name]}")
    for name in ("integrations", "psfs"):
        if resolved[name] is not None and resolved[name] < 1:
            raise CoronInputError(name, f"must be >= 1, got {resolved[name]}")
    if resolved["align_to"] not in ("each", "first"):
        raise CoronInputError(
            "align_to", f"must be 'each' or 'first', got {resolved['align_to']!r}"
        )
    if resolved["format"] not in ("fits", "zarr"):
        raise CoronInputError("format", f"must be 'fits' or 'zarr', got {resolved['format']!r}")
    bit_value(resolved["bad_bits"])  # names it cannot read are bad input too
    return resolved


def build_products(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    align_to: AlignTo | None = None,
    truncate: int | None = None,
    median_box_length: int | None = None,
    bad_bits: str | int | None = None,
    psfmask: str | Path | None = None,
    integrations: int | None = None,
    psfs: int | None = None,
    format: Format | None = None,
    task_memory: int = 2**30,
    workers: int = 1,
) -> list[Product]:
    """Build the lazy psfstack, psfalign and psfsub products of an association.

    Step parameters are jwst's; those left None take coron-dask's configured defaults
    (``coron_dask.yaml``: align_to "each", truncate 50, median_box_length 3, bad_bits
    "DO_NOT_USE"; pass bad_bits="" for none). Blocks hold ``integrations`` science
    integrations and ``psfs`` references, planned from ``task_memory`` (bytes per worker
    thread) and ``workers`` where not given. ``format`` "zarr" writes each product as a
    Zarr store (``<name>.zarr``) instead of FITS.
    """
    resolved = resolve_parameters(
        align_to=align_to,
        truncate=truncate,
        median_box_length=median_box_length,
        bad_bits=bad_bits,
        integrations=integrations,
        psfs=psfs,
        format=format,
    )
    align_to, truncate, median_box_length = (
        resolved["align_to"],
        resolved["truncate"],
        resolved["median_box_length"],
    )
    bad_bits, integrations, psfs, format = (
        resolved["bad_bits"],
        resolved["integrations"],
        resolved["psfs"],
        resolved["format"],
    )
    observation = open_association(asn)
    plan = plan_observation(observation, task_memory, workers, truncate)
    integrations = integrations or plan.integrations
    psfs = psfs or plan.psfs
    observation = open_association(asn, integrations, psfs)
    association = observation.association
    output_dir = Path(output_dir)
    stack = observation.psfstack
    mask = None if psfmask is None else read_psfmask(psfmask, (stack.sizes["y"], stack.sizes["x"]))
    asn_keywords = {"ASNTABLE": association.path.name}
    stack_keywords = {**stack.attrs, **asn_keywords, "S_PSFSTK": "COMPLETE"}
    stack_name = f"{association.product_name}_psfstack.{format}"
    products = [
        Product(
            output_dir / stack_name,
            {**stack_keywords, "DATAMODL": "CubeModel", "FILENAME": stack_name},
            _extensions(stack, stack["sci"].attrs),
        )
    ]
    for exposure in observation.science:
        psfalign, filled = align_refs(
            exposure,
            stack,
            mask,
            median_box_length=median_box_length,
            bad_bits=bad_bits,
            align_to=align_to,
        )
        psfsub = klip(filled, psfalign, truncate)
        root = f"{exposure_root(exposure)}_{association.asn_id}"
        model = "QuadModel" if align_to == "each" else "CubeModel"
        align_name, sub_name = f"{root}_psfalign.{format}", f"{root}_psfsub.{format}"
        products.append(
            Product(
                output_dir / align_name,
                {
                    **stack_keywords,
                    "DATAMODL": model,
                    "S_PSFALI": "COMPLETE",
                    "FILENAME": align_name,
                },
                _extensions(psfalign[["sci", "err"]], stack["sci"].attrs),
            )
        )
        products.append(
            Product(
                output_dir / sub_name,
                {
                    **exposure.attrs,
                    **asn_keywords,
                    "DATAMODL": "CubeModel",
                    "S_PSFALI": "COMPLETE",
                    "S_KLIP": "COMPLETE",
                    "FILENAME": sub_name,
                },
                _extensions(psfsub, exposure["sci"].attrs),
            )
        )
    return products


def run_coron3(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    memory_limit: str | float | None = None,
    progress: bool = True,
    quiet: bool = False,
    report: str | Path | None = None,
    stats: str | Path | None = None,
    cluster: Cluster | None = None,
    **parameters: object,
) -> list[Path]:
    """Run calwebb_coron3 on an association and return the paths of the products written.

    ``parameters`` are those of ``build_products`` (align_to, truncate, median_box_length,
    bad_bits, integrations, psfs, format). ``scheduler``: None starts a LocalCluster of
    ``n_workers`` processes for the run; an address or ``scheduler_file`` uses a running
    cluster; ``"synchronous"`` or ``"threads"`` use dask's local schedulers; a ``cluster``
    already under way (``cluster.Cluster``) is used as it is. The input is checked before
    the cluster is used, so bad input fails fast and leaves no product. ``report`` saves
    dask's performance report (HTML), ``stats`` a JSON summary of where the time went.
    """
    parameters = resolve_parameters(**parameters)
    observation = open_association(asn)  # check every input before using the cluster
    if psfmask is not None:
        stack = observation.psfstack
        read_psfmask(psfmask, (stack.sizes["y"], stack.sizes["x"]))
    with contextlib.ExitStack() as stack:
        if cluster is None:
            cluster = stack.enter_context(
                Cluster(
                    scheduler,
                    scheduler_file,
                    n_workers=n_workers,
                    memory_limit=memory_limit,
                    quiet=quiet,
                )
            )
        client = cluster.client
        memory, workers = task_memory(client)
        products = build_products(
            asn, output_dir, psfmask=psfmask, **parameters, task_memory=memory, workers=workers
        )
        return write_products(
            products,
            lambda *writes: execute(writes, client, progress=progress, report=report, stats=stats),
        )
