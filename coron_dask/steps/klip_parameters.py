"""klip's parameters as klip uses them: the KL cutoffs for the references there are
(``truncate``), and the zones for the star's place in an exposure (``annuli``,
``subsections``, ``annuli_spacing``, ``iwa``, ``owa``), each checked and logged as jwst's
steps log their decisions."""

import logging
from collections.abc import Sequence

import numpy as np

from coron_dask.core.errors import CoronInputError
from coron_dask.core.parameters import BY_NAME
from coron_dask.core.readers import cutoffs as read_cutoffs
from coron_dask.kernels.zones import Zones, describe, polar, zone_map

log = logging.getLogger(__name__)


def kl_cutoffs(truncate: int | Sequence[int]) -> tuple[int, ...]:
    """The KL cutoffs of ``truncate`` (one, or several: a KL-mode cube), ascending, checked
    as the parameter is (``core.readers.cutoffs``: each at least 1)."""
    found = read_cutoffs(truncate)
    return (found,) if isinstance(found, int) else found


def used_cutoffs(truncate: int | Sequence[int], npsf: int) -> int | tuple[int, ...]:
    """``truncate`` as klip uses it with ``npsf`` references: a cutoff above ``npsf`` keeps
    all ``npsf`` KL modes, so it is ``npsf``; several cutoffs stay a KL-mode cube, of the
    distinct ones. jwst's klip slices the KL vectors (``klvect[:truncate]``): the same
    modes, silently. Logged: a warning for cutoffs the user asked for, information for the
    default (jwst's 50, more than most observations have references)."""
    cube = not isinstance(truncate, int | np.integer)
    asked = kl_cutoffs(truncate)
    kept = tuple(sorted({min(k, npsf) for k in asked}))
    if kept != asked:
        shown = ",".join(map(str, asked))
        default = asked == kl_cutoffs(BY_NAME["truncate"].default)
        log.log(
            logging.INFO if default else logging.WARNING,
            "klip: truncate %s is more than the %d references: %s KL modes kept%s",
            shown,
            npsf,
            ",".join(map(str, kept)),
            f" ({len(asked) - len(kept)} cutoff(s) the same as another, dropped)"
            if len(kept) < len(asked)
            else "",
        )
    return kept if cube else kept[0]


def whole_frame(annuli: int = 1, subsections: int = 1, iwa: float = 0.0, owa=None) -> bool:
    """Whether these zone parameters make one zone of the whole frame (jwst's KLIP)."""
    return annuli == 1 and subsections == 1 and not iwa and owa is None


def klip_zones(
    shape: tuple[int, int],
    star: tuple[float, float],
    *,
    annuli: int = 1,
    subsections: int = 1,
    annuli_spacing: str = "constant",
    iwa: float = 0.0,
    owa: float | None = None,
    source: object = "science",
    logged: bool = True,
) -> Zones | None:
    """KLIP's zones on frames of ``shape`` about the ``star`` (x, y), pixels, as pyKLIP
    makes them (``kernels.zones``), ``logged``; None for one zone over the whole frame.
    Raises CoronInputError naming the parameter where they cannot be made."""
    if whole_frame(annuli, subsections, iwa, owa):
        return None
    if owa is not None and owa <= iwa:
        raise CoronInputError("owa", f"must be above the iwa ({iwa:g} px), got {owa:g}")
    farthest = float(np.sqrt(polar(shape, star)[0].max()))
    if iwa >= farthest:
        raise CoronInputError(
            "iwa", f"{iwa:g} px leaves no pixel of {source}: its farthest is {farthest:.1f} px"
        )
    try:
        zones = zone_map(shape, star, annuli, subsections, annuli_spacing, iwa, owa)
    except ValueError as error:
        raise CoronInputError("annuli", f"{error}: ask for fewer") from None
    if not (zones.labels >= 0).any():
        raise CoronInputError("iwa", f"no pixel of {source} lies between the iwa and the owa")
    if logged:
        log.info("klip: %s: %s (%s spacing)", source, describe(zones), annuli_spacing)
    return zones
