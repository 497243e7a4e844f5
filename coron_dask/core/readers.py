"""How a parameter's value is read and checked (``core.parameters``' readers): text from the
command line or the environment read as the parameter's type, or one CoronInputError that
names the parameter and says what is wrong."""

import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from coron_dask.core.dqflags import bit_value
from coron_dask.core.errors import CoronInputError

#: A reader: ``read(value, name)`` is the value as used (text from the command line or the
#: environment read as the parameter's type), or CoronInputError naming ``name``.
Reader = Callable[[object, str], object]


def _either(options: Iterable[str]) -> str:
    words = [repr(option) for option in options]
    return " or ".join(words) if len(words) < 3 else f"one of {', '.join(words)}"


@dataclass(frozen=True)
class Number:
    """A number (text read as one): whole or not, within the bounds given (``above``: a
    bound it must exceed)."""

    whole: bool = True
    low: float | None = None
    high: float | None = None
    above: float | None = None

    def __call__(self, value: object, name: str) -> object:
        kind = "a whole number" if self.whole else "a number"
        if isinstance(value, str):
            try:
                value = int(value) if self.whole else float(value)
            except ValueError:
                raise CoronInputError(name, f"must be {kind}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if self.whole else numbers.Real
        ):
            raise CoronInputError(name, f"must be {kind}, got {value!r}")
        if self.low is not None and value < self.low:
            raise CoronInputError(name, f"must be >= {self.low}, got {value}")
        if self.high is not None and value > self.high:
            raise CoronInputError(name, f"must be <= {self.high}, got {value}")
        if self.above is not None and not value > self.above:
            raise CoronInputError(name, f"must be > {self.above}, got {value}")
        return value


@dataclass(frozen=True)
class OneOf:
    """One of ``options`` (words)."""

    options: tuple[str, ...]

    def __call__(self, value: object, name: str) -> object:
        if value not in self.options:
            raise CoronInputError(name, f"must be {_either(self.options)}, got {value!r}")
        return value


@dataclass(frozen=True)
class Steps:
    """Steps to skip, from ``options``: one name, or several (a tuple)."""

    options: tuple[str, ...]

    def __call__(self, value: object, name: str) -> tuple[str, ...]:
        value = value or ()
        steps = (value,) if isinstance(value, str) else tuple(value)
        unknown = set(steps) - set(self.options)
        if unknown:
            raise CoronInputError(name, f"steps {sorted(unknown)} cannot be skipped")
        return steps


def cutoffs(value: object, name: str = "truncate") -> int | tuple[int, ...]:
    """klip's truncate (an int, a sequence or a text such as "5,10,20,50"): one cutoff as an
    int (jwst's psfsub), several as a KL-mode cube's ascending cutoffs, each at least 1
    (jwst takes 0, which keeps no KL mode: the psfsub is the science frame itself)."""
    if isinstance(value, str):
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise CoronInputError(
                name, f"must be whole numbers separated by commas, got {value!r}"
            ) from None
    try:
        values = (value,) if isinstance(value, numbers.Integral) else tuple(value)
    except TypeError:
        raise CoronInputError(name, f"must be whole numbers, got {value!r}") from None
    if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) for k in values):
        raise CoronInputError(name, f"must be whole numbers, got {value!r}")
    if not values or any(k < 1 for k in values):
        shown = ",".join(str(k) for k in values) or "none"
        raise CoronInputError(
            name, f"must be one or more KL mode counts >= 1 (0 keeps none), got {shown}"
        )
    found = tuple(sorted({int(k) for k in values}))
    return found[0] if len(found) == 1 else found


def dq_bits(value: object, name: str) -> object:
    """DQ flags as jwst reads them (names or an integer), checked and kept as given."""
    bit_value(value, name)
    return value


def flag(value: object, name: str) -> bool:
    """True or False."""
    if not isinstance(value, bool):
        raise CoronInputError(name, f"must be True or False, got {value!r}")
    return value


def path(value: object, name: str) -> Path:
    """A file's path."""
    if not isinstance(value, str | Path):
        raise CoronInputError(name, f"must be a file's path, got {value!r}")
    return Path(value)


def text(value: object, name: str) -> str:
    """A text (an address, a size)."""
    if not isinstance(value, str | Path):
        raise CoronInputError(name, f"must be a text, got {value!r}")
    return str(value)


def job_range(value: object, name: str) -> tuple[int, int]:
    """MIN:MAX batch jobs (text) or a pair, 1 <= MIN <= MAX: blocks are planned from the
    first worker's memory."""
    try:
        low, high = (int(part) for part in (value.split(":") if isinstance(value, str) else value))
    except (ValueError, TypeError):
        raise CoronInputError(name, f"expected MIN:MAX, got {value!r}") from None
    if not 1 <= low <= high:
        raise CoronInputError(name, f"expected 1 <= MIN <= MAX, got {value!r}")
    return low, high


def numbers_list(value: object, name: str) -> list[float]:
    """Numbers: a sequence, or text separated by commas."""
    try:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return [float(part) for part in value]
    except (ValueError, TypeError):
        raise CoronInputError(name, f"must be numbers separated by commas, got {value!r}") from None
