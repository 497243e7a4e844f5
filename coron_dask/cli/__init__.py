"""The ``coron-dask`` command."""

from coron_dask.cli.main import main

__all__ = ["main"]
