"""The input of a run: an association opened lazily and checked, the blocks planned for it,
the PSFMASK align_refs weighs its fit with."""

import logging
from dataclasses import dataclass
from pathlib import Path

import xarray as xr
from dask.utils import parse_bytes

from coron_dask.core import config
from coron_dask.core.config import resolve_parameters
from coron_dask.core.errors import CoronInputError
from coron_dask.core.parameters import PSFMASK_CHOICES
from coron_dask.io import Association, open_exposure, read_association
from coron_dask.io.reference_files import best_psfmask
from coron_dask.planning import block_plan as chunking
from coron_dask.planning.block_plan import BlockPlan, Workers
from coron_dask.steps.klip_parameters import whole_frame
from coron_dask.steps.references import adi_counts
from coron_dask.steps.stack_refs import stack_refs

log = logging.getLogger(__name__)


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
    windows: tuple = (0, (0, 0)),
) -> BlockPlan:
    """Blocks for ``observation`` on ``workers`` (parameters: those of ``build_products``,
    resolved; blocks given there are kept; ``injections``: sets of companions subtracted on
    the same bases; ``windows``: how many windows of KL images the companions' forward
    model takes and their shape, (n, (wy, wx)), and with ADI the pixels of each one's
    negative injection, (n, (wy, wx), pixels)), with the settings under coron_dask.chunks."""
    p = parameters or resolve_parameters()
    zoning = tuple(p[name] for name in ("annuli", "subsections", "iwa", "owa"))
    sizes = chunking.Observation(
        science_nints=tuple(e.sizes["integration"] for e in observation.science),
        # ADI: the other rolls' science integrations are references too (the most any has)
        psf_nints=(
            *(e.sizes["integration"] for e in observation.psf if "RDI" in p["mode"]),
            *((max(adi_counts(observation.science)),) if "ADI" in p["mode"] else ()),
        ),
        frame=(observation.psfstack.sizes["y"], observation.psfstack.sizes["x"]),
        truncate=p["truncate"],
        align_to=p["align_to"],
        save_psfalign=p["save_psfalign"],
        format=p["format"],
        injections=injections,
        own_bases=bool(injections) and "ADI" in p["mode"],
        zones=None if whole_frame(*zoning) else zoning[0] * zoning[1],
        maxnumbasis=p["maxnumbasis"],
        # RDI: KL images on the windows; ADI: negative injection on each companion's
        # windows (in every roll), of windows[2] pixels
        companions=windows[0] if p["mode"] == "RDI" else 0,
        window=tuple(windows[1]),
        negative=windows[2] if p["mode"] != "RDI" and len(windows) > 2 else 0,
    )
    return chunking.plan_blocks(
        sizes,
        workers,
        fraction=float(config.get("chunks.memory-fraction")),
        tile_bytes=parse_bytes(config.get("chunks.klip-tile")),
        tasks_per_thread=int(config.get("chunks.alignment-tasks-per-thread")),
        block_least=parse_bytes(config.get("chunks.alignment-block-least")),
        integrations=p["integrations"],
        psfs=p["psfs"],
        outlier_rows=p["outlier_rows"],
    )


def find_psfmask(asn: str | Path, psfmask: str | Path | None = None) -> Path | str:
    """The PSFMASK of align_refs: ``psfmask`` if it names a file; from CRDS for the first
    science exposure's header, as jwst finds it, for "crds" (the default, the setting
    ``coron_dask.align_refs.psfmask``); "none" for none (every pixel weighs 1 in the
    alignment fit). Raises CoronInputError, in one line, where CRDS has none for it or
    cannot be reached."""
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
