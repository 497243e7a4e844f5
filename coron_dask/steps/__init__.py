"""One module per calwebb_coron3 step, with jwst's names and parameters, on lazy xarray data
(``from coron_dask.steps.align_refs import align_refs``), and ``steps.blocks``, the
functions their tasks run.

Nothing is imported here, so that a worker unpickling a task of ``steps.blocks`` imports
numpy and the kernels only, not dask.array or xarray.
"""
