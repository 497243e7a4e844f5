"""Reading associations and calints lazily, writing JWST-named products block by block.

Names are imported on first use, so that a worker unpickling ``io.fitsfile`` objects does
not import dask.array and xarray.
"""

import importlib

_EXPORTS = {
    "Association": "asn",
    "read_association": "asn",
    "open_exposure": "fits",
    "read_psfmask": "fits",
    "Extension": "products",
    "Product": "products",
    "write_products": "products",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
