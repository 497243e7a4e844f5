"""coron-dask: JWST coronagraphic stage 3 (calwebb_coron3) on Dask and xarray.

Names are imported on first use: dask workers import ``coron_dask.kernels`` and
``coron_dask.io.fitsfile`` without pulling in the pipeline's dependencies.
"""

from coron_dask.lazy import lazy_exports

__version__ = "0.1.0"
_EXPORTS = {
    "build_products": "pipeline",
    "open_association": "pipeline",
    "run_coron3": "pipeline",
    "open_exposure": "io",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
