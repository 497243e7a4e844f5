"""Where companions' fits start: the places asked (``--at``) or a run's candidates above
a S/N (``--candidates``, ``--min-snr``), each checked to lie on every science frame and
outside KLIP's inner working angle."""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from coron_dask.core import config
from coron_dask.core.errors import CoronInputError
from coron_dask.science.companion_model import detector_place
from coron_dask.science.geometry import pixel_positions, sky_wcs, star_position

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guess:
    """Where a companion's fit starts: separation (arcsec), position angle (degrees E of N)."""

    separation: float
    position_angle: float
    name: str = ""


def candidate_guesses(candidates) -> list[Guess]:
    """The starts of the candidates of a run (``<product>_candidates.ecsv``, an astropy
    Table with ``separation_arcsec`` and ``pa``: ``photometry.find_candidates``)."""
    guesses = []
    for number, row in enumerate(candidates, 1):
        separation, angle = float(row["separation_arcsec"]), float(row["pa"])
        if not (np.isfinite(separation) and np.isfinite(angle)):
            raise CoronInputError("candidates", f"candidate {number} has no sky position (no WCS)")
        guesses.append(Guess(separation, angle, f"candidate {number}"))
    return guesses


def fitted_candidates(table: Table, threshold: float, cutoff: int | None, where: str) -> Table:
    """The rows of a run's candidates ``table`` (``where`` names it in the log) that are
    fitted: of a KL-mode cube, those found on the plane fitted (``cutoff``; None: the
    largest; the detection lists a companion once per plane), of S/N ≥ ``threshold``."""
    if "kl" in table.colnames and len(table):
        plane = max(int(k) for k in table["kl"]) if cutoff is None else int(cutoff)
        table = table[np.asarray(table["kl"]) == plane]
        where = f"{where} (KL {plane})"
    kept = table[np.asarray(table["snr"], dtype=float) >= threshold] if len(table) else table
    log.info(
        "companions: %d of %d candidates of %s at S/N >= %g",
        len(kept),
        len(table),
        where,
        threshold,
    )
    return kept


def requested_guesses(
    at: list | None = None,
    candidates: str | Path | None = None,
    min_snr: float | None = None,
    cutoff: int | None = None,
) -> list[Guess]:
    """The companions asked for: each ``at`` (separation arcsec, PA degrees E of N), else
    the ``candidates`` file's rows (a run's ``_candidates.ecsv``) of S/N ≥ ``min_snr``
    (default ``coron_dask.companions.min-snr``) on the KL ``cutoff``'s plane."""
    if at:
        guesses = []
        for number, place in enumerate(at, 1):
            if len(place) != 2 or not place[0] > 0 or not np.all(np.isfinite(place)):
                raise CoronInputError("at", f"SEP,PA with SEP > 0 arcsec, got {place}")
            guesses.append(Guess(float(place[0]), float(place[1]), f"companion {number}"))
        return guesses
    if candidates is None:
        raise CoronInputError("at", "say which companions: --at SEP,PA or --candidates FILE")
    try:
        table = Table.read(candidates, format="ascii.ecsv")
    except (OSError, ValueError) as error:
        raise CoronInputError(
            "candidates", f"{candidates}: not a candidates ECSV ({error})"
        ) from None
    threshold = config.get("companions.min-snr") if min_snr is None else min_snr
    if "snr" not in table.colnames:
        raise CoronInputError("candidates", f"{candidates}: no snr column")
    kept = fitted_candidates(table, threshold, cutoff, Path(candidates).name)
    if not len(kept):
        raise CoronInputError(
            "candidates", f"{candidates}: no candidate at S/N >= {threshold:g} (--min-snr)"
        )
    return candidate_guesses(kept)


def check_places(science: list, guesses: list[Guess], iwa: float) -> None:
    """Each companion's start on every science exposure's frame and outside KLIP's inner
    working angle (``iwa``, pixels), else CoronInputError naming --at or --candidates."""
    star = star_position(science[0].attrs, science[0].encoding.get("source", "science"))
    for k, exposure in enumerate(science):
        wcs = sky_wcs(exposure)
        centre = pixel_positions(wcs, star)[0]
        frame = (exposure.sizes["x"], exposure.sizes["y"])
        for guess in guesses:
            source = "candidates" if guess.name.startswith("candidate") else "at"
            x, y = detector_place(wcs, star, guess.separation, guess.position_angle)[0]
            where = f'{guess.name} at {guess.separation:g}", {guess.position_angle:g}°'
            if not (0 <= x <= frame[0] - 1 and 0 <= y <= frame[1] - 1):
                raise CoronInputError(
                    source,
                    f"{where} falls off exposure {k}'s frame, at (x, y) = ({x:.1f}, {y:.1f}) px",
                )
            if np.hypot(x - centre[0], y - centre[1]) < iwa:
                raise CoronInputError(
                    source, f"{where} is inside the inner working angle ({iwa:g} px, --iwa)"
                )
