"""KLIP's references by subtraction strategy (pyKLIP's and spaceKLIP's ``mode``).

- ``RDI`` (jwst's, the default): the reference star's frames (the psfstack).
- ``ADI``: the science integrations of the other rolls, filled as the references are and
  aligned to each science integration exactly as the reference star's frames are (same fit,
  same shift): the star's PSF seen at another roll angle, on which a companion has turned
  with the sky.
- ``ADI+RDI``: both, the reference star's first.

``reference_pool`` gathers every frame any integration may take (written once to a scratch
file that each alignment task reads its block from), ``references_of`` which of them a
science exposure takes (its psfalign's planes, in that order), and ``eligible_references``
where, zone by zone, an ADI reference may be used: not where the roll moves a companion at
the zone's radius by less than ``movement`` pixels (pyKLIP's ``movement``), so a companion
does not subtract itself. That eligibility is the reference-choice mask ``chosen`` of
``steps.klip.kl_basis``, or the ``eligible`` among which ``steps.reference_choice`` takes
the references most correlated with each integration (``maxnumbasis``).
"""

import logging
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from coron_dask.core.errors import CoronInputError
from coron_dask.kernels.zones import Zones

log = logging.getLogger(__name__)

MODES = ("RDI", "ADI", "ADI+RDI")
#: Rolls closer than this (degrees) are the same roll: never ADI references of each other.
SAME_ROLL = 1e-6


def roll_angle(exposure: xr.Dataset) -> float:
    """The exposure's roll (degrees): ROLL_REF of its SCI header (the V3 roll at the
    reference point, as the JWST pipeline writes it), else ROLL_REF or PA_V3 of its primary
    header. Raises CoronInputError where there is none."""
    for keywords in (exposure["sci"].attrs, exposure.attrs):
        for keyword in ("ROLL_REF", "PA_V3"):
            if keywords.get(keyword) is not None:
                return float(keywords[keyword])
    source = exposure.encoding.get("source", "science")
    raise CoronInputError(source, "has no ROLL_REF or PA_V3: its roll is needed for ADI")


def _adi_frames(exposure: xr.Dataset) -> xr.Dataset:
    """A filled science exposure as reference frames: (psf, y, x), named as the psfstack's."""
    name = Path(exposure.encoding.get("source", "science")).name
    nints = exposure.sizes["integration"]
    frames = exposure[["sci", "err"]].rename(integration="psf").drop_vars("psf", errors="ignore")
    return frames.assign_coords(
        psf_exposure=("psf", np.full(nints, name)),
        psf_integration=("psf", np.asarray(exposure["integration"].values)),
        psf_kind=("psf", np.full(nints, "ADI")),
        psf_roll=("psf", np.full(nints, roll_angle(exposure))),
    )


def reference_pool(refs: xr.Dataset, science: list[xr.Dataset], mode: str) -> xr.Dataset:
    """Every frame a science integration of ``mode`` may take as a reference, in psfalign's
    order: the reference star's filled frames ``refs`` (RDI), then each filled ``science``
    exposure's integrations (ADI), in the association's order. RDI: ``refs`` as they are."""
    if mode not in MODES:
        raise CoronInputError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "RDI":
        return refs
    parts = [_adi_frames(exposure) for exposure in science]
    if "RDI" in mode:
        npsf = refs.sizes["psf"]
        roll = refs.attrs.get("ROLL_REF", refs.attrs.get("PA_V3"))
        named = {  # as the psfstack names them (``stack_refs``), or by their place
            name: ("psf", refs[name].values if name in refs.coords else default)
            for name, default in (
                ("psf_exposure", np.full(npsf, "")),
                ("psf_integration", np.arange(npsf) + 1),
            )
        }
        rdi = (
            refs[["sci", "err"]]
            .drop_vars("psf")
            .assign_coords(
                **named,
                psf_kind=("psf", np.full(npsf, "RDI")),
                psf_roll=("psf", np.full(npsf, np.nan if roll is None else float(roll))),
            )
        )
        parts.insert(0, rdi)
    pool = xr.concat(parts, dim="psf", combine_attrs="override", join="override")
    return pool.assign_coords(psf=np.arange(pool.sizes["psf"])).assign_attrs(refs.attrs)


def references_of(pool: xr.Dataset, roll: float) -> np.ndarray:
    """The places in ``pool`` of the references of a science exposure at ``roll``: the
    reference star's frames, and the science integrations of other rolls (never its own
    roll's). Every frame of an RDI pool."""
    if "psf_kind" not in pool.coords:
        return np.arange(pool.sizes["psf"])
    kinds = pool["psf_kind"].values
    other = np.abs(pool["psf_roll"].values - roll) > SAME_ROLL
    return np.flatnonzero((kinds == "RDI") | ((kinds == "ADI") & other))


def fewest_references(science: list[xr.Dataset], npsf: int, mode: str) -> int:
    """The fewest references a ``science`` exposure has in ``mode``: the reference star's
    ``npsf`` frames (RDI) and the other rolls' integrations (ADI). Raises CoronInputError
    where an exposure would have none."""
    if mode == "RDI":
        return npsf
    adi = adi_counts(science)
    if min(adi) == 0:
        roll = roll_angle(science[0])
        raise CoronInputError(
            "mode", f"{mode}: the science exposures are all at one roll ({roll:g} deg)"
        )
    return (npsf if "RDI" in mode else 0) + min(adi)


def adi_counts(science: list[xr.Dataset]) -> list[int]:
    """How many ADI references each ``science`` exposure has: the other rolls' integrations."""
    rolls = np.array([roll_angle(exposure) for exposure in science])
    nints = np.array([exposure.sizes["integration"] for exposure in science])
    return [int(nints[np.abs(rolls - roll) > SAME_ROLL].sum()) for roll in rolls]


def contiguous_blocks(places: np.ndarray, most: int | None) -> tuple[int, ...]:
    """Blocks of ``places`` (indices into a file) that are each one contiguous run of at most
    ``most`` frames: an alignment task reads its block in one read."""
    breaks = np.flatnonzero(np.diff(places) != 1) + 1
    blocks: list[int] = []
    for run in np.split(places, breaks):
        size = len(run)
        step = most or size
        blocks += [min(step, size - start) for start in range(0, size, step)]
    return tuple(blocks)


def select_references(pool: xr.Dataset, places: np.ndarray) -> xr.Dataset:
    """The references at ``places`` of ``pool``: psfalign's planes, numbered from 0."""
    if len(places) == pool.sizes["psf"] and "psf_kind" not in pool.coords:
        return pool
    chosen = pool.isel(psf=places)
    return chosen.assign_coords(psf=np.arange(len(places)))


def exposure_references(
    pool: xr.Dataset, exposure: xr.Dataset, mode: str, psfs: int | None
) -> tuple[xr.Dataset, np.ndarray | None, float | None]:
    """The references of a science ``exposure`` in ``mode``, taken from ``pool`` in
    blocks of at most ``psfs`` contiguous frames, their places in it and the exposure's
    roll (RDI: the pool as it is, None, None)."""
    if mode == "RDI":
        return pool, None, None
    roll = roll_angle(exposure)
    places = references_of(pool, roll)
    refs = select_references(pool, places).chunk({"psf": contiguous_blocks(places, psfs)})
    return refs, places, roll


def zone_radii(zones: Zones | None, shape: tuple[int, int]) -> np.ndarray:
    """Each zone's radius as pyKLIP's movement takes it: the mean of its annulus's inner
    and outer edges (``(radstart + radend) / 2``); one zone, the whole frame: pyKLIP's one
    annulus from 0 to the frame's height."""
    if zones is None:
        return np.array([shape[0] / 2.0])
    middles = (zones.edges[:-1] + zones.edges[1:]) / 2.0
    return np.repeat(middles, zones.subsections)


def movements(radii: np.ndarray, rolls: np.ndarray, roll: float) -> np.ndarray:
    """How far (pixels, (Z, p)) the roll from ``roll`` to each of ``rolls`` moves a source
    at each of ``radii`` from the star: the chord 2·r·sin(Δθ/2)."""
    half = np.radians(np.abs(np.asarray(rolls, dtype=np.float64) - roll)) / 2.0
    return 2.0 * radii[:, None] * np.sin(half)[None, :]


def eligible_references(
    psfalign: xr.Dataset,
    roll: float,
    zones: Zones | None,
    movement: float,
    chunks: tuple[int, ...],
    *,
    source: str = "science",
) -> da.Array:
    """Where each reference of ``psfalign`` may be used (m, Z, p) bool, in ``chunks`` of
    integrations, for a science exposure at ``roll``: a reference star's frame everywhere;
    another roll's integration in the zones where the roll moves a companion by at least
    ``movement`` pixels (pyKLIP's ``moves >= minmove``). Logs how many ADI references each
    zone keeps."""
    npsf, m = psfalign.sizes["psf"], sum(chunks)
    shape = (psfalign.sizes["y"], psfalign.sizes["x"])
    radii = zone_radii(zones, shape)
    if "psf_kind" not in psfalign.coords:
        mask = np.ones((len(radii), npsf), dtype=bool)
    else:
        adi = psfalign["psf_kind"].values == "ADI"
        moved = movements(radii, psfalign["psf_roll"].values, roll) >= movement
        mask = ~adi[None, :] | moved
        kept = mask[:, adi].sum(axis=1)
        log.info(
            "klip: %s: ADI references kept per zone (of %d; movement %g px at radii %s px): %s",
            source,
            int(adi.sum()),
            movement,
            ", ".join(f"{r:.1f}" for r in radii),
            ", ".join(str(int(k)) for k in kept),
        )
    return da.broadcast_to(da.from_array(mask)[None], (m, *mask.shape), chunks=(chunks, -1, -1))


def unreferenced(chosen: da.Array, zones: Zones | None, shape: tuple[int, int]) -> da.Array:
    """(m, y, x) bool: the pixels of each integration whose zone has no reference ``chosen``
    (m, Z, p): pyKLIP leaves such a zone unreduced (NaN), e.g. ADI's inner annuli, where
    the roll moves nothing far enough."""
    empty = ~chosen.any(axis=-1)
    labels = np.zeros(shape, np.int16) if zones is None else zones.labels
    return da.map_blocks(
        _unreferenced_block,
        empty,
        labels=labels,
        drop_axis=1,
        new_axis=(1, 2),
        chunks=(empty.chunks[0], (shape[0],), (shape[1],)),
        dtype=bool,
    )


def _unreferenced_block(empty: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return empty[:, np.maximum(labels, 0)] & (labels >= 0)[None]
