"""Quicklook figures (PNG): what a person looks at first after a run.

``quicklook(outdir)`` draws, from the products in ``outdir`` (FITS, or Zarr stores, read
through ``io.open_product``):

- ``<psfsub stem>_mean.png``: each psfsub's mean over integrations, one panel per KL cutoff,
  and how KLIP reduced it (mode, zones, references chosen);
- ``<product>_i2d.png``: the i2d (its largest KL cutoff), with a north/east compass, a scale
  bar, the star and the candidates;
- ``<product>_snr.png``: the detection map's significance, candidates circled;
- ``<product>_contrast.png``: the contrast curve, redrawn from its ECSV;
- ``<exposure>_shifts.png``: the alignment fits (DX, DY, BETA) against science integration
  (with ADI, the other rolls' integrations apart from the reference star's frames).

The figures are ``quicklook.figures``'s; this module finds the products of a folder.
"""

import logging
from pathlib import Path

from coron_dask.core.errors import CoronInputError
from coron_dask.quicklook.figures import (
    contrast_figure,
    i2d_figure,
    psfsub_figure,
    shifts_figure,
    snr_figure,
)
from coron_dask.quicklook.reading import read_alignment, read_candidates, read_contrast

log = logging.getLogger(__name__)

#: The product kinds ``quicklook`` recognises, by the ending of their names.
KINDS = ("psfsub", "psfalign", "i2d", "snr", "contrast")


def _kind(path: Path) -> tuple[str, str] | None:
    """(kind, stem) of a product's name, or None for anything else."""
    stem = path.name.removesuffix(path.suffix)
    for kind in KINDS:
        if not stem.endswith(f"_{kind}"):
            continue
        if kind == "contrast" and path.suffix == ".ecsv":
            return kind, stem
        if kind != "contrast" and path.suffix in (".fits", ".zarr"):
            return kind, stem
    return None


def products(outdir: Path) -> dict[str, dict[str, Path]]:
    """The products in ``outdir`` by kind and stem; a product written both as FITS and as
    Zarr is taken from its FITS file."""
    found: dict[str, dict[str, Path]] = {kind: {} for kind in KINDS}
    for path in sorted(outdir.iterdir(), key=lambda p: (p.suffix != ".fits", p.name)):
        recognised = _kind(path)
        if recognised is not None:
            found[recognised[0]].setdefault(recognised[1], path)
    return found


def quicklook(outdir: str | Path, folder: str | Path | None = None) -> list[Path]:
    """Write the quicklook PNGs of the products in ``outdir`` (a run's output folder) into
    ``folder`` (default: ``outdir``) and return their paths: each psfsub's mean, the i2d,
    the detection map, the contrast curve (where there is one) and each science exposure's
    alignment fits (see the module's docstring).

    Raises CoronInputError (one line naming the folder or file) when ``outdir`` is not a
    folder, holds no product, or a product cannot be read."""
    outdir = Path(outdir)
    if not outdir.exists():
        raise CoronInputError(outdir, "no such folder")
    if not outdir.is_dir():
        raise CoronInputError(outdir, "not a folder: give the folder of a run's products")
    found = products(outdir)
    if not any(found.values()):
        raise CoronInputError(
            outdir,
            "no coron-dask product here (*_psfsub, *_psfalign, *_i2d, *_snr .fits or .zarr, "
            "*_contrast.ecsv)",
        )
    folder = outdir if folder is None else Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CoronInputError(folder, "not a folder: the PNGs go into a folder")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, path in found["psfsub"].items():
        written.append(psfsub_figure(path, folder / f"{stem}_mean.png"))
    for stem, path in found["i2d"].items():
        candidates = read_candidates(outdir / f"{stem.removesuffix('_i2d')}_candidates.ecsv")
        written.append(i2d_figure(path, candidates, folder / f"{stem}.png"))
    for stem, path in found["snr"].items():
        candidates = read_candidates(outdir / f"{stem.removesuffix('_snr')}_candidates.ecsv")
        written.append(snr_figure(path, candidates, folder / f"{stem}.png"))
    for stem, path in found["contrast"].items():
        table = read_contrast(path)
        written.append(contrast_figure(table, folder / f"{stem}.png"))
    exposures: dict[str, list[Path]] = {}
    for kind in ("psfsub", "psfalign"):  # the same record in both: psfsub's, if there
        for stem, path in found[kind].items():
            exposures.setdefault(stem.removesuffix(f"_{kind}"), []).append(path)
    for exposure, paths in exposures.items():
        alignment = next(filter(None, map(read_alignment, paths)), None)
        if alignment is None or len(alignment["INTEGRATION"]) == 0:
            log.warning("quicklook: %s has no ALIGN table: no shifts figure", paths[0].name)
            continue
        written.append(shifts_figure(alignment, exposure, folder / f"{exposure}_shifts.png"))
    return written
