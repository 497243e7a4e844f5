"""Reading associations and calints lazily, writing JWST-named products block by block.

Names are imported on first use, so that a worker unpickling ``io.fitsfile`` objects does
not import dask.array and xarray.
"""

from coron_dask.core.lazy import lazy_exports

_EXPORTS = {
    "Association": "asn",
    "read_association": "asn",
    "open_exposure": "fits",
    "open_product": "backend",
    "read_psfmask": "fits",
    "Column": "products",
    "Extension": "products",
    "Product": "products",
    "OnDisk": "products",
    "table": "products",
    "staged_products": "staging",
    "write_blocks": "staging",
    "write_products": "staging",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
