"""The ground floor: errors, configuration and its parameter spec, DQ flags. Imports numpy and
dask.config only."""
