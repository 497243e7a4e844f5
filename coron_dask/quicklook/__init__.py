"""Quicklook figures of a run's products, read through ``coron_dask.io``."""
