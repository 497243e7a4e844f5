"""Pure numpy algorithms of coronagraphic stage 3: no dask, no files, float64 inside."""

from coron_dask.kernels.fourier_shift import fourier_shift
from coron_dask.kernels.klip import KLBasis, kl_basis, klip_error, klip_subtract
from coron_dask.kernels.median_fill import median_fill
from coron_dask.kernels.registration import fit_shifts

__all__ = [
    "KLBasis",
    "fit_shifts",
    "fourier_shift",
    "kl_basis",
    "klip_error",
    "klip_subtract",
    "median_fill",
]
