"""calwebb_coron3 on dask: association in, JWST-named products out, in one computation.

``build_products`` only builds the graph (nothing is read beyond headers, nothing computed);
``run_coron3`` connects to a cluster and writes the products.
"""

from dataclasses import dataclass
from pathlib import Path

import dask
import xarray as xr

from coron_dask.cluster import connect, execute
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


def integrations_per_chunk(nframes: int, npix: int, nints: int, chunk_bytes: int) -> int:
    """Science integrations per block: a block with its aligned references fits ``chunk_bytes``,
    and an exposure splits into at least four blocks when it can."""
    by_memory = max(1, chunk_bytes // max(1, nframes * npix * 4))
    return int(max(1, min(by_memory, -(-nints // 4))))


def open_association(asn: str | Path, integrations: int | None = None) -> Observation:
    """Open an association: science exposures chunked by integration, references stacked."""
    association = read_association(asn)
    psf = [open_exposure(path) for path in association.psf]
    psfstack = stack_refs(psf)
    chunk_bytes = dask.utils.parse_bytes(dask.config.get("array.chunk-size"))
    science = []
    for path in association.science:
        exposure = open_exposure(path)
        nints = exposure.sizes["integration"]
        npix = exposure.sizes["y"] * exposure.sizes["x"]
        chunk = integrations or integrations_per_chunk(
            psfstack.sizes["psf"], npix, nints, chunk_bytes
        )
        science.append(exposure.chunk({"integration": chunk}))
    return Observation(association, science, psfstack)


def _keywords(attrs: dict, **updates: object) -> dict:
    return {**attrs, **updates}


def build_products(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    align_to: AlignTo = "each",
    truncate: int = 50,
    median_box_length: int = 3,
    bad_bits: str | int | None = "DO_NOT_USE",
    psfmask: str | Path | None = None,
    integrations: int | None = None,
) -> list[Product]:
    """Build the lazy psfstack, psfalign and psfsub products of an association."""
    if truncate < 0:
        raise CoronInputError("truncate", f"must be >= 0, got {truncate}")
    if median_box_length < 0:
        raise CoronInputError("median_box_length", f"must be >= 0, got {median_box_length}")
    if integrations is not None and integrations < 1:
        raise CoronInputError("integrations", f"must be >= 1, got {integrations}")
    observation = open_association(asn, integrations)
    association = observation.association
    output_dir = Path(output_dir)
    stack = observation.psfstack
    frame = (stack.sizes["y"], stack.sizes["x"])
    for exposure in observation.science:
        if (exposure.sizes["y"], exposure.sizes["x"]) != frame:
            raise CoronInputError(
                exposure.encoding["source"],
                f"frames are {exposure.sizes['y']}x{exposure.sizes['x']} pixels, "
                f"the PSF frames {frame[0]}x{frame[1]}",
            )
    mask = None if psfmask is None else read_psfmask(psfmask, frame)
    asn_keywords = {"ASNTABLE": association.path.name}
    stack_keywords = _keywords(stack.attrs, **asn_keywords, S_PSFSTK="COMPLETE")
    products = [
        Product(
            output_dir / f"{association.product_name}_psfstack.fits",
            _keywords(
                stack_keywords,
                DATAMODL="CubeModel",
                FILENAME=f"{association.product_name}_psfstack.fits",
            ),
            [
                Extension("SCI", stack["sci"].data, stack["sci"].attrs),
                Extension("ERR", stack["err"].data),
                Extension("DQ", stack["dq"].data),
            ],
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
        products.append(
            Product(
                output_dir / f"{root}_psfalign.fits",
                _keywords(
                    stack_keywords,
                    DATAMODL=model,
                    S_PSFALI="COMPLETE",
                    FILENAME=f"{root}_psfalign.fits",
                ),
                [
                    Extension("SCI", psfalign["sci"].data, stack["sci"].attrs),
                    Extension("ERR", psfalign["err"].data),
                ],
            )
        )
        products.append(
            Product(
                output_dir / f"{root}_psfsub.fits",
                _keywords(
                    exposure.attrs,
                    **asn_keywords,
                    DATAMODL="CubeModel",
                    S_PSFALI="COMPLETE",
                    S_KLIP="COMPLETE",
                    FILENAME=f"{root}_psfsub.fits",
                ),
                [
                    Extension("SCI", psfsub["sci"].data, exposure["sci"].attrs),
                    Extension("ERR", psfsub["err"].data),
                    Extension("DQ", psfsub["dq"].data),
                ],
            )
        )
    return products


def run_coron3(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    align_to: AlignTo = "each",
    truncate: int = 50,
    median_box_length: int = 3,
    bad_bits: str | int | None = "DO_NOT_USE",
    psfmask: str | Path | None = None,
    integrations: int | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    memory_limit: str | float | None = "auto",
    progress: bool = True,
    quiet: bool = False,
) -> list[Path]:
    """Run calwebb_coron3 on an association and return the paths of the products written.

    ``scheduler``: None starts a LocalCluster of ``n_workers`` processes for the run; an
    address or ``scheduler_file`` uses a running cluster; ``"synchronous"`` or ``"threads"``
    use dask's local schedulers. The graph is built before any cluster starts, so bad input
    fails fast and leaves no product.
    """
    products = build_products(
        asn,
        output_dir,
        align_to=align_to,
        truncate=truncate,
        median_box_length=median_box_length,
        bad_bits=bad_bits,
        psfmask=psfmask,
        integrations=integrations,
    )
    with connect(
        scheduler, scheduler_file, n_workers=n_workers, memory_limit=memory_limit, quiet=quiet
    ) as client:
        return write_products(products, lambda *writes: execute(writes, client, progress=progress))


__all__ = ["Observation", "build_products", "open_association", "run_coron3"]
