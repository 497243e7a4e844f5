"""align_refs: bad-pixel fill, then every reference PSF registered to the science frames.

``align_to="each"`` (default) aligns every reference to every science integration and gives
the 4-D psfalign (integration, psf, y, x) that jwst wrote before 1.16; ``align_to="first"``
aligns them to the first integration of the exposure, as jwst >= 1.16, giving (psf, y, x).
Fits run in float64 (see ``kernels.registration``); products are float32 as jwst's.
"""

from typing import Literal

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from coron_dask.core.dqflags import PIXEL, bit_value
from coron_dask.core.errors import CoronInputError
from coron_dask.io.products import Column, Extension, OnDisk, table
from coron_dask.kernels.blocks import fill_block
from coron_dask.steps.blocks import fit_block, shift_block

AlignTo = Literal["each", "first"]
SHIFT_PARAMS = ["dx", "dy", "beta"]


def median_replace_img(
    exposure: xr.Dataset, median_box_length: int = 3, bad_bits: str | int | None = "DO_NOT_USE"
) -> xr.Dataset:
    """``exposure`` with bad pixels (DQ & bad_bits, or NaN) replaced by local medians.

    jwst fills SCI only, so a Fourier-shifted ERR is NaN everywhere once a single pixel is;
    here ERR is filled the same way, which keeps the psfalign ERR meaningful.
    """
    if median_box_length < 0:
        raise CoronInputError("median_box_length", f"must be >= 0, got {median_box_length}")
    miri = str(exposure.attrs.get("INSTRUME", "")).upper() == "MIRI"
    non_science = PIXEL["NON_SCIENCE"] if miri else None  # jwst: MIRI's become 0, not filled
    bits = bit_value(bad_bits)
    exposure = exposure.chunk({})  # dask-backed variables unchanged, numpy ones one block
    sci, dq = exposure["sci"].data, exposure["dq"].data
    arguments = (median_box_length, bits, non_science)
    filled = {
        name: exposure[name].copy(
            data=da.map_blocks(
                fill_block,
                exposure[name].data,
                sci,
                dq,
                *arguments,
                dtype=exposure[name].dtype,
                name=f"AlignRefs-fill-{name}-" + tokenize(exposure[name].data, sci, dq, *arguments),
            )
        )
        for name in ("sci", "err")
    }
    return exposure.assign(filled)


def align_refs(
    science: xr.Dataset,
    psfstack: xr.Dataset,
    psfmask: np.ndarray | None = None,
    *,
    median_box_length: int = 3,
    bad_bits: str | int | None = "DO_NOT_USE",
    align_to: AlignTo = "each",
) -> tuple[xr.Dataset, xr.Dataset]:
    """Fill bad pixels in both inputs and align the references: (psfalign, filled science).

    psfalign holds ``sci`` and ``err`` (the references' SCI and ERR shifted alike, as jwst)
    and ``shift``: the fitted (dx, dy, β) of each reference, and ``converged``: whether
    its fit converged (``fit``: both as fitted, one array). A pair whose fit did not
    (``kernels.registration.fit_shifts``) is flagged: its aligned SCI and ERR are NaN, and
    klip leaves it out. The filled science is what KLIP subtracts from, as in jwst, where
    align_refs fills the science cube in place.
    """
    science = median_replace_img(science, median_box_length, bad_bits)
    refs = median_replace_img(psfstack, median_box_length, bad_bits)
    return align_models(science, refs, psfmask, align_to=align_to), science


def align_models(
    science: xr.Dataset,
    refs: xr.Dataset,
    psfmask: np.ndarray | None = None,
    *,
    align_to: AlignTo = "each",
    on_disk: dict[str, OnDisk] | None = None,
    psfs: int | None = None,
    places: np.ndarray | None = None,
) -> xr.Dataset:
    """psfalign of the filled references ``refs`` on the filled ``science`` (see
    ``align_refs``), ``psfs`` references per alignment task (default: the blocks of
    ``refs``).

    With ``on_disk`` ({"sci": ..., "err": ...}: the filled references written to disk,
    ``io.staging.write_blocks``), each task that fits or shifts references reads its
    block from disk: no worker holds every reference for the whole alignment. ``places``:
    where ``refs`` are in those files (default: all of them, in order; ADI's references
    are some of the frames written), in blocks each one contiguous run (``refs``' blocks).
    """
    frame = (science.sizes["y"], science.sizes["x"])
    if (refs.sizes["y"], refs.sizes["x"]) != frame:
        raise CoronInputError(
            science.encoding.get("source", "science"),
            f"frames are {frame[0]}x{frame[1]} pixels, the PSF frames "
            f"{refs.sizes['y']}x{refs.sizes['x']}",
        )
    if align_to not in ("each", "first"):
        raise CoronInputError("align_to", f"must be 'each' or 'first', got {align_to!r}")
    mask = da.from_array(np.ones(frame) if psfmask is None else np.asarray(psfmask, np.float64))
    target = science["sci"].data
    if align_to == "first":
        target = target[:1].rechunk({0: 1})
    # each reference block as an argument: the block itself, or its indices on disk, which
    # the task reads from the source once the writes it depends on have run
    references, reading = {}, {}
    for name in ("sci", "err"):
        data, stored = refs[name].data, (on_disk or {}).get(name)
        chunks = (psfs,) if psfs else data.chunks[:1]
        if stored is None:
            references[name], reading[name] = (data.rechunk((*chunks, -1, -1)), "pyx"), ()
        elif places is None:
            indices = da.arange(refs.sizes["psf"], chunks=chunks)
            references[name] = (indices, "p")
            reading[name] = (stored.source, None, stored.written.rechunk(indices.chunks), "p")
        else:  # blocks of contiguous places (``steps.references.contiguous_blocks``)
            indices = da.from_array(np.asarray(places), chunks=data.chunks[:1])
            written = stored.written[np.asarray(places)].rechunk(indices.chunks)
            references[name] = (indices, "p")
            reading[name] = (stored.source, None, written, "p")
    # (dx, dy, β, converged) of each pair: the shifts, and which fits are flagged
    fits = da.blockwise(
        fit_block,
        "mpk",
        target,
        "myx",
        *references["sci"],
        mask,
        "yx",
        *reading["sci"],
        new_axes={"k": 4},
        concatenate=True,
        dtype=np.float64,
        name="AlignRefs-fit-" + tokenize(target, references["sci"], reading["sci"], mask),
    )
    if align_to == "first":
        fits = fits[0]
        dims = ("psf", "y", "x")
        index, shift_index = "pyx", "pk"
    else:
        dims = ("integration", "psf", "y", "x")
        index, shift_index = "mpyx", "mpk"
    # SCI and ERR in tasks of their own: each output is one array, freed on its own, and
    # ERR is computed only when psfalign is written
    aligned = {
        name: da.blockwise(
            shift_block,
            index,
            *references[name],
            fits,
            shift_index,
            *reading[name],
            # read from disk, the frames come from no input
            new_axes={"y": frame[0], "x": frame[1]} if reading[name] else None,
            concatenate=True,
            dtype=np.float32,
            name=f"AlignRefs-shift-{name}-" + tokenize(references[name], reading[name], fits),
        )
        for name in references
    }
    coords = {k: v for k, v in refs.coords.items() if "psf" in v.dims}
    if align_to == "each":
        coords["integration"] = science["integration"]
    return xr.Dataset(
        {
            "sci": (dims, aligned["sci"]),
            "err": (dims, aligned["err"]),
            "shift": ((*dims[:-2], "param"), fits[..., :3]),
            "converged": (dims[:-2], fits[..., 3].astype(bool)),  # 1 or 0
            # the fits as fitted: what a run taken up reads back (``pipeline.build``)
            "fit": ((*dims[:-2], "fit"), fits),
        },
        coords={**coords, "param": SHIFT_PARAMS},
        attrs=dict(refs.attrs),
    )


#: What the ALIGN table says of its sign convention (header COMMENT, README)
ALIGN_CONVENTION = (
    "DX, DY: the reference's offset from the science frame in pixels along x (columns) and "
    "y (rows), its star's position minus the science star's: the science frame moved by "
    "+(DX, DY) (towards higher pixel indices) and scaled by BETA best matches the "
    "reference, and align_refs moved the reference by -(DX, DY) onto the science frame. "
    "BETA: the reference's flux over the science frame's (the references are not scaled). "
    "CONVERGED 0: the fit did not converge; the pair is flagged (aligned frame NaN, left "
    "out by klip)."
)


def alignment_table(psfalign: xr.Dataset) -> Extension:
    """ALIGN, the alignment record of ``psfalign`` (``align_models``): the fitted (dx, dy,
    β) of every reference for every science integration, as a table extension of one row
    per (integration, reference), integration-major.

    Columns: INTEGRATION (1-based, of the science exposure; 1, the one aligned to, with
    align_to "first"), PSF (0-based plane of psfalign: the psfstack's index in RDI),
    PSF_FILE and PSF_INT (the reference's exposure file and 1-based integration, where the
    stack names them), with ``--mode`` ADI or ADI+RDI KIND (RDI: the reference star's frame,
    ADI: another roll's science integration) and ROLL (its ROLL_REF, degrees), DX and
    DY (pixel; sign: ``ALIGN_CONVENTION``), BETA, and CONVERGED (1, or 0 where the fit did
    not converge: the pair is flagged, its aligned frame NaN and left out by klip; DX, DY
    and BETA are then where the fit stopped, NaN where it could not start). Lazy: computed
    with the products, from the same fits the shifts come from.
    """
    shift = psfalign["shift"]
    npsf = shift.sizes["psf"]
    each = "integration" in shift.dims
    integrations = psfalign["integration"].values if each else np.array([1])
    fitted = shift.transpose(..., "param").data.rechunk(-1).reshape(-1, 3)
    converged = psfalign["converged"].data.rechunk(-1).reshape(-1)

    def per_row(values: object) -> da.Array:
        """A value per reference, on every row: the stack's coords (lazy, one block) tiled
        in one task, not one per integration."""
        column = da.asarray(values).rechunk(-1)
        rows = ((len(integrations) * npsf,),)
        return column.map_blocks(np.tile, len(integrations), chunks=rows, dtype=column.dtype)

    columns = [
        Column(
            "INTEGRATION",
            np.repeat(integrations, npsf).astype(np.int32),
            "",
            "science integration (1-based)",
        ),
        Column("PSF", per_row(shift["psf"].values).astype(np.int32), "", "psfstack index"),
    ]
    if "psf_exposure" in psfalign.coords:
        files = per_row(psfalign["psf_exposure"].data)
        columns.append(Column("PSF_FILE", files, "", "reference exposure"))
    if "psf_integration" in psfalign.coords:
        numbers = per_row(psfalign["psf_integration"].data).astype(np.int32)
        columns.append(Column("PSF_INT", numbers, "", "its integration (1-based)"))
    if "psf_kind" in psfalign.coords:  # ADI: which plane is which (``steps.references``)
        kinds = per_row(psfalign["psf_kind"].data)
        columns.append(Column("KIND", kinds, "", "RDI: reference star; ADI: another roll"))
        rolls = per_row(psfalign["psf_roll"].data)
        columns.append(Column("ROLL", rolls, "deg", "reference's roll (ROLL_REF)"))
    index = {name: k for k, name in enumerate(shift["param"].values)}
    columns += [
        Column("DX", fitted[:, index["dx"]], "pixel", "reference x - science x"),
        Column("DY", fitted[:, index["dy"]], "pixel", "reference y - science y"),
        Column("BETA", fitted[:, index["beta"]], "", "reference flux / science flux"),
        Column("CONVERGED", converged.astype(np.uint8), "", "1: fit converged; 0: flagged"),
    ]
    keywords = {
        "ALIGN_TO": ("each" if each else "first", "science integrations aligned to"),
        "COMMENT": [
            "Alignment record of align_refs: one row per (science integration, reference).",
            ALIGN_CONVENTION,
        ],
    }
    return table("ALIGN", columns, keywords)
