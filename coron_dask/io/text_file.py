"""A product that is a text file (an ECSV table, such as the detection's candidates): one
extension, a lazy array of one element holding the file's whole text, made by the task
that formats it and written by its store task (``staging.stored``) into the file's
partial, which is placed with the run's other products."""

from pathlib import Path

import dask.array as da
import numpy as np

from coron_dask.io.products import Extension, Product

#: The suffixes of products written as text.
TEXT_SUFFIXES = (".ecsv",)


def is_text(product: Product) -> bool:
    return product.path.suffix in TEXT_SUFFIXES


def text_extension(name: str, text: da.Array) -> Extension:
    """Extension ``name`` of a text product: ``text``, one element (an object array of
    shape (1,)) holding the file's text."""
    if text.shape != (1,) or text.dtype != object:
        raise ValueError(f"{name}: a text product's data is one text, got {text.shape}")
    return Extension(name, text)


class TextFile:
    """A write target (``stored``): a text file, written whole by one task (picklable)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextFile) and vars(self) == vars(other)

    def __setitem__(self, key: tuple[slice, ...], block: np.ndarray) -> None:
        with open(self.path, "w", encoding="utf-8", newline="") as handle:
            handle.write(str(block[0]))


def reserve_text(product: Product, partial: Path) -> list[TextFile]:
    """Create the empty ``partial`` of text ``product``; its one target."""
    if len(product.extensions) != 1:
        raise ValueError(f"{product.path.name}: a text product holds one text")
    partial.touch()
    return [TextFile(partial)]
