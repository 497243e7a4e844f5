"""coron-dask: JWST coronagraphic stage 3 (calwebb_coron3) on Dask and xarray.

Names are imported on first use: dask workers import ``coron_dask.kernels`` and
``coron_dask.io.fitsfile`` without pulling in the pipeline's dependencies.
"""

import tomllib
from importlib import metadata
from pathlib import Path

from coron_dask.core.lazy import lazy_exports


def _version() -> str:
    """coron-dask's version: the installed package's metadata; in a source tree that is not
    installed, pyproject.toml's; else "0+unknown"."""
    try:
        return metadata.version("coron-dask")
    except metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
        if project["project"]["name"] == "coron-dask":
            return str(project["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    return "0+unknown"


__version__ = _version()
_EXPORTS = {
    "build_products": "pipeline.build",
    "open_association": "pipeline.observation",
    "run_coron3": "pipeline.run",
    "open_exposure": "io",
    "open_product": "io",
    "contrast_curve": "pipeline.contrast",
    "measure_companions": "pipeline.companions",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
