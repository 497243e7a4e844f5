"""coron-dask: JWST coronagraphic stage 3 (calwebb_coron3) on Dask and xarray."""

__version__ = "0.1.0"
