"""One module per calwebb_coron3 step, with jwst's names and parameters, on lazy xarray data."""

from coron_dask.steps.align_refs import align_models, align_refs, median_replace_img
from coron_dask.steps.klip import klip
from coron_dask.steps.outlier_detection import outlier_detection
from coron_dask.steps.stack_refs import stack_refs

__all__ = [
    "align_models",
    "align_refs",
    "klip",
    "median_replace_img",
    "outlier_detection",
    "stack_refs",
]
