"""The runtime's settings in dask's configuration (``coron_dask.cluster.*``), read in the
units the code uses."""

from dask.utils import parse_timedelta

from coron_dask.core import config


def seconds(setting: str, given: float | str | None = None) -> float:
    """``given``, else the setting ``coron_dask.cluster.<setting>``, in seconds."""
    return parse_timedelta(given or config.get(f"cluster.{setting}"), "s")
