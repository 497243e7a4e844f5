"""coron-dask: JWST coronagraphic stage 3 (calwebb_coron3) on Dask and xarray."""

__version__ = "0.1.0"

from coron_dask.io import open_exposure
from coron_dask.pipeline import build_products, open_association, run_coron3

__all__ = ["build_products", "open_association", "open_exposure", "run_coron3"]
