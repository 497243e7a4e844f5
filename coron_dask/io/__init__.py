"""Reading associations and calints lazily, writing JWST-named products block by block."""

from coron_dask.io.asn import Association, read_association
from coron_dask.io.fits import open_exposure, read_psfmask
from coron_dask.io.products import Extension, Product, write_products

__all__ = [
    "Association",
    "Extension",
    "Product",
    "open_exposure",
    "read_association",
    "read_psfmask",
    "write_products",
]
