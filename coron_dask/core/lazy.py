"""Package attributes imported on first use (PEP 562), so that importing a light module of a
package (what a dask worker does to unpickle a task) does not import the heavy ones."""

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` giving ``exports`` (name -> submodule of ``package``)."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return __getattr__
