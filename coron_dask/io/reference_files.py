"""Reference files from CRDS, as jwst finds them: the PSFMASK of align_refs.

jwst's align_refs asks CRDS (the JWST Calibration Reference Data System) for the best
``psfmask`` reference file for the science exposure's header. coron-dask does the same
through the ``crds`` client: it reads the mappings (the context) and the reference files
from its cache under ``CRDS_PATH`` (default ``~/crds_cache``), and fetches what the cache
lacks from ``CRDS_SERVER_URL`` (https://jwst-crds.stsci.edu). On a compute node without
network, a cache filled beforehand (``crds sync``, or a run on the login node) is enough.
"""

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from coron_dask.core.errors import CoronInputError

log = logging.getLogger(__name__)

#: The FITS keywords CRDS selects JWST reference files with, and the data-model names
#: its rules (rmaps) use for them.
CRDS_KEYWORDS = {
    "TELESCOP": "META.TELESCOPE",
    "INSTRUME": "META.INSTRUMENT.NAME",
    "DETECTOR": "META.INSTRUMENT.DETECTOR",
    "CHANNEL": "META.INSTRUMENT.CHANNEL",
    "MODULE": "META.INSTRUMENT.MODULE",
    "FILTER": "META.INSTRUMENT.FILTER",
    "PUPIL": "META.INSTRUMENT.PUPIL",
    "CORONMSK": "META.INSTRUMENT.CORONAGRAPH",
    "BAND": "META.INSTRUMENT.BAND",
    "SUBARRAY": "META.SUBARRAY.NAME",
    "EXP_TYPE": "META.EXPOSURE.TYPE",
    "READPATT": "META.EXPOSURE.READPATT",
    "DATE-OBS": "META.OBSERVATION.DATE",
    "TIME-OBS": "META.OBSERVATION.TIME",
}
SERVER = "https://jwst-crds.stsci.edu"


def crds_parameters(header: dict) -> dict:
    """The parameters CRDS chooses a reference file by, from a science exposure's primary
    keywords (those it has)."""
    return {
        name: str(header[keyword]) for keyword, name in CRDS_KEYWORDS.items() if keyword in header
    }


def where() -> str:
    """Where CRDS looks: its cache and its server, as the environment sets them."""
    cache = os.environ.get("CRDS_PATH", str(Path.home() / "crds_cache"))
    return f"CRDS_PATH={cache}, CRDS_SERVER_URL={os.environ.get('CRDS_SERVER_URL', SERVER)}"


@contextlib.contextmanager
def _crds_log_kept(said: list) -> Iterator[None]:
    """crds logs to stderr itself, warnings about its server and fatal errors (before it
    exits): its records are kept in ``said`` instead, for coron-dask's one line."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record)

    logger = logging.getLogger("CRDS")
    handlers = list(logger.handlers)
    for handler in handlers:
        logger.removeHandler(handler)
    keep = Keep()
    logger.addHandler(keep)
    try:
        yield
    finally:
        logger.removeHandler(keep)
        for handler in handlers:
            logger.addHandler(handler)


def best_psfmask(science: str | Path, header: dict) -> Path:
    """The PSFMASK reference file CRDS gives for ``science`` (its primary ``header``),
    from the cache, fetched into it if missing. Raises CoronInputError, in one line,
    where CRDS has none or cannot be reached, saying how to give one by hand."""
    how = (
        "give the coronagraph's PSFMASK with --psfmask FILE (or --psfmask none to weigh "
        f"every pixel 1 in the alignment fit); CRDS looked in {where()}"
    )
    try:
        from crds.core import exceptions, log  # noqa: F401  log: crds' logger, whose records we keep
    except ImportError:
        raise CoronInputError(
            science, f"no PSFMASK: the crds client is not installed; {how}"
        ) from None
    os.environ.setdefault("CRDS_SERVER_URL", SERVER)
    said: list[logging.LogRecord] = []
    try:
        with _crds_log_kept(said):
            import crds  # its configuration may warn as it loads

            found = crds.getreferences(
                crds_parameters(header), reftypes=["psfmask"], observatory="jwst"
            )["psfmask"]
    except (exceptions.CrdsError, OSError, KeyError, ValueError, SystemExit) as error:  # crds exits
        errors = [r.getMessage() for r in said if r.levelno >= logging.ERROR] or [str(error)]
        reason = " ".join(errors[-1].split())
        if "connection and cache load FAILED" in reason:  # crds' words for it
            reason = "the server did not answer and the cache holds no synced CRDS context"
        reason = reason if len(reason) < 300 else reason[:297] + "..."
        raise CoronInputError(science, f"no PSFMASK from CRDS ({reason}); {how}") from None
    if "N/A" in found.upper() or not Path(found).is_file():
        raise CoronInputError(science, f"CRDS has no PSFMASK for this exposure ({found}); {how}")
    return Path(found)
