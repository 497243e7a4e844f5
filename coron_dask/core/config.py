"""coron-dask's defaults in dask's configuration (namespace ``coron_dask``), as dask-jobqueue
keeps its own: shipped in coron_dask.yaml, overridden by the user's dask YAML files or by
``DASK_CORON_DASK__...`` environment variables."""

from pathlib import Path

import dask
import yaml

with open(Path(__file__).with_name("coron_dask.yaml")) as handle:
    dask.config.update_defaults(yaml.safe_load(handle))


def get(key: str) -> object:
    """The configured value of ``coron_dask.<key>``, e.g. ``get("klip.truncate")``."""
    return dask.config.get(f"coron_dask.{key}")
