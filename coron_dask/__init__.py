"""coron-dask: JWST coronagraphic stage 3 (calwebb_coron3) on Dask and xarray.

Names are imported on first use: dask workers import ``coron_dask.kernels`` and
``coron_dask.io.fitsfile`` without pulling in the pipeline's dependencies.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "build_products": "pipeline",
    "open_association": "pipeline",
    "run_coron3": "pipeline",
    "open_exposure": "io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"coron_dask.{_EXPORTS[name]}"), name)
