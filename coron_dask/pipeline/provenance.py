"""What every product records of how it was made, the way jwst records it in its headers.

jwst writes into every product the calibration software's version (CAL_VER), the UTC date
the file was made (DATE), the association (ASNTABLE), the reference files used (R_*
keywords, "N/A" for none) and each step's status (S_* keywords: COMPLETE or SKIPPED); the
step parameters it keeps only in its logs. coron-dask writes the same keywords, plus what
a run needs to be reproduced: the step parameters actually used, the block plan (its KLIP
tile rows are part of the numerics) and the member exposures that went into the product.

``provenance`` builds that record once, as keywords that both writers use as they are: a
FITS primary header (8-character names with comments; the long texts as HISTORY entries)
and a Zarr store's attributes (the same names and values). ``read_provenance`` reads the
record back from either.
"""

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from coron_dask import __version__
from coron_dask.core.parameters import STEPS
from coron_dask.planning.block_plan import BlockPlan

SOFTWARE = "coron-dask"
#: Each step and the keyword of its status (jwst's cal_step keywords), in the pipeline's order.
STEP_STATUS = {
    "outlier_detection": "S_OUTLIR",
    "stack_refs": "S_PSFSTK",
    "align_refs": "S_PSFALI",
    "klip": "S_KLIP",
    "resample": "S_RESAMP",
}
#: Each step parameter recorded: its keyword (the parameter's name where it fits in 8
#: characters) and the keyword's comment, from the parameter spec.
PARAMETERS = {parameter.name: parameter.keyword for parameter in STEPS if parameter.keyword}
#: Those that may be None (the OWA: none given), recorded as NONE.
NULLABLE = {parameter.name for parameter in STEPS if parameter.none is not None}
#: Each number of the block plan: its keyword and comment.
PLAN = {
    "integrations": ("BLKINTS", "science integrations per block"),
    "psfs": ("BLKPSFS", "references per alignment block"),
    "outlier_rows": ("BLKROWS", "rows per outlier_detection median slab"),
    "klip_rows": ("KLIPROWS", "rows per KLIP tile (part of the numerics)"),
}
#: Prefix of the keywords listing the inputs of each exposure type (NSCIEXP, SCIEX001, ...).
INPUTS = {"science": "SCI", "psf": "PSF"}
NO_FILE = "N/A"  # jwst's value for a reference file not used
NONE = "none"  # no step skipped, no value given (no OWA)


def _plain(value: object) -> object:
    """``value`` as a FITS header and JSON take it: numpy scalars as Python numbers."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def _ascii(text: str) -> str:
    """``text`` in the printable ASCII a FITS header holds (× as x)."""
    return text.replace("×", "x").encode("ascii", "replace").decode("ascii")


def utc_date(date: datetime | None = None) -> str:
    """``date`` (default: now) as jwst writes DATE: ISO 8601, UTC, in milliseconds."""
    date = datetime.now(UTC) if date is None else date
    if date.tzinfo is not None:
        date = date.astimezone(UTC).replace(tzinfo=None)
    return date.isoformat(timespec="milliseconds")


def provenance(
    parameters: Mapping[str, object],
    plan: BlockPlan,
    science: Iterable[str | Path] = (),
    psf: Iterable[str | Path] = (),
    *,
    steps: Iterable[str] = (),
    asn: str | Path | None = None,
    psfmask: str | Path | None = None,
    date: datetime | None = None,
) -> dict:
    """The keywords that record how a product was made, for its primary header.

    ``parameters`` are the resolved ones (``core.config.resolve_parameters``), ``plan`` the
    block plan used, ``science`` and ``psf`` the member exposures that went into the product
    (ASN order), ``steps`` those that made it (each COMPLETE, or SKIPPED when in the
    parameters' skip), ``date`` when it was made (default: now). Values are plain or
    (value, comment) pairs; "HISTORY" holds a list of entries.
    """
    skipped = tuple(parameters["skip"])
    keywords: dict = {
        "CAL_NAME": (SOFTWARE, "calibration software that made this file"),
        "CAL_VER": (__version__, f"{SOFTWARE} version"),
        "DATE": (utc_date(date), "UTC date file created"),
    }
    if asn is not None:
        keywords["ASNTABLE"] = (Path(asn).name, "association table")
    keywords["R_PSFMAS"] = (Path(psfmask).name if psfmask else NO_FILE, "PSFMASK reference file")
    for step in steps:
        keywords[STEP_STATUS[step]] = "SKIPPED" if step in skipped else "COMPLETE"
    recorded = {name: _plain(parameters[name]) for name in PARAMETERS}
    recorded["skip"] = ",".join(skipped) or NONE
    recorded.update({name: NONE for name in NULLABLE & set(recorded) if recorded[name] is None})
    if not isinstance(recorded["truncate"], int):  # a KL-mode cube's cutoffs
        recorded["truncate"] = ",".join(str(k) for k in recorded["truncate"])
    for name, (key, comment) in PARAMETERS.items():
        keywords[key] = (recorded[name], comment)
    for name, (key, comment) in PLAN.items():
        keywords[key] = (int(getattr(plan, name)), comment)
    for exptype, files in (("science", science), ("psf", psf)):
        prefix, names = INPUTS[exptype], [Path(file).name for file in files]
        keywords[f"N{prefix}EXP"] = (len(names), f"{exptype} exposures in this product")
        for number, name in enumerate(names, start=1):
            keywords[f"{prefix}EX{number:03d}"] = (name, f"{exptype} exposure")
    given = " ".join(f"{name}={value}" for name, value in recorded.items())
    keywords["HISTORY"] = [
        _ascii(f"{SOFTWARE} {__version__} calwebb_coron3, {keywords['DATE'][0]} UTC"),
        _ascii(f"parameters: {given} psfmask={keywords['R_PSFMAS'][0]}"),
        _ascii(f"block plan: {plan.describe()}"),
    ]
    return keywords


def read_provenance(keywords: Mapping[str, object]) -> dict:
    """The record ``provenance`` wrote, read back from a product's primary header (astropy)
    or its Zarr attributes: software, version, date (aware, UTC), asn, psfmask (None when
    none), steps (status of each step recorded), parameters (by name, as resolved), plan
    (its numbers) and the science and psf exposures (file names, ASN order)."""
    parameters = {name: keywords[key] for name, (key, _) in PARAMETERS.items()}
    skip = str(parameters["skip"])
    parameters["skip"] = () if skip == NONE else tuple(skip.split(","))
    parameters.update(
        {name: None for name in NULLABLE & set(parameters) if parameters[name] == NONE}
    )
    if isinstance(parameters["truncate"], str):  # a KL-mode cube's cutoffs
        parameters["truncate"] = tuple(int(k) for k in parameters["truncate"].split(","))
    psfmask = keywords["R_PSFMAS"]
    record = {
        "software": keywords["CAL_NAME"],
        "version": keywords["CAL_VER"],
        "date": datetime.fromisoformat(str(keywords["DATE"])).replace(tzinfo=UTC),
        "asn": keywords.get("ASNTABLE"),
        "psfmask": None if psfmask == NO_FILE else psfmask,
        "steps": {step: keywords[key] for step, key in STEP_STATUS.items() if key in keywords},
        "parameters": parameters,
        "plan": {name: keywords[key] for name, (key, _) in PLAN.items()},
    }
    for exptype, prefix in INPUTS.items():
        count = int(keywords[f"N{prefix}EXP"])
        record[exptype] = [keywords[f"{prefix}EX{n:03d}"] for n in range(1, count + 1)]
    return record
