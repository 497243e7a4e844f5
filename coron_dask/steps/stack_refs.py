"""stack_refs: all reference-PSF integrations in one stack along dim ``psf`` (``_psfstack``)."""

from pathlib import Path

import numpy as np
import xarray as xr

from coron_dask.core.errors import CoronInputError


def stack_refs(psf_exposures: list[xr.Dataset]) -> xr.Dataset:
    """Concatenate reference exposures in ASN order; coords name each frame's source.

    ``psf_exposure`` is the file name and ``psf_integration`` the integration number of each
    frame. Attributes come from the first exposure, as jwst's stack takes its meta.
    """
    first = psf_exposures[0]
    frame = (first.sizes["y"], first.sizes["x"])
    stacks = []
    for exposure in psf_exposures:
        name = Path(exposure.encoding["source"]).name
        if (exposure.sizes["y"], exposure.sizes["x"]) != frame:
            raise CoronInputError(
                exposure.encoding["source"],
                f"frames are {exposure.sizes['y']}x{exposure.sizes['x']} pixels, "
                f"the first PSF exposure's are {frame[0]}x{frame[1]}",
            )
        stacks.append(
            exposure[["sci", "err", "dq"]]
            .rename(integration="psf")
            .assign_coords(
                psf_exposure=("psf", np.full(exposure.sizes["integration"], name)),
                psf_integration=("psf", exposure["integration"].values),
            )
        )
    stack = xr.concat(stacks, dim="psf", combine_attrs="override")
    return stack.assign_coords(psf=np.arange(stack.sizes["psf"]))
