"""JWST pixel data-quality bits (the values of ``stdatamodels.jwst.dqflags.pixel``), and
the bit-mask expressions jwst's steps take ("~DO_NOT_USE", "OUTLIER, SATURATED", "18")."""

import re

from coron_dask.core.errors import CoronInputError

PIXEL = {
    "GOOD": 0,
    "DO_NOT_USE": 2**0,
    "SATURATED": 2**1,
    "JUMP_DET": 2**2,
    "DROPOUT": 2**3,
    "OUTLIER": 2**4,
    "PERSISTENCE": 2**5,
    "AD_FLOOR": 2**6,
    "CHARGELOSS": 2**7,
    "UNRELIABLE_ERROR": 2**8,
    "NON_SCIENCE": 2**9,
    "DEAD": 2**10,
    "HOT": 2**11,
    "WARM": 2**12,
    "LOW_QE": 2**13,
    "RC": 2**14,
    "TELEGRAPH": 2**15,
    "NONLINEAR": 2**16,
    "BAD_REF_PIXEL": 2**17,
    "NO_FLAT_FIELD": 2**18,
    "NO_GAIN_VALUE": 2**19,
    "NO_LIN_CORR": 2**20,
    "NO_SAT_CHECK": 2**21,
    "UNRELIABLE_BIAS": 2**22,
    "UNRELIABLE_DARK": 2**23,
    "UNRELIABLE_SLOPE": 2**24,
    "UNRELIABLE_FLAT": 2**25,
    "OPEN": 2**26,
    "ADJ_OPEN": 2**27,
    "FLUX_ESTIMATED": 2**28,
    "MSA_FAILED_OPEN": 2**29,
    "OTHER_BAD_PIXEL": 2**30,
    "REFERENCE_PIXEL": 2**31,
}


def bit_value(bits: str | int | None, parameter: str = "bad_bits") -> int:
    """DQ bits from names or integers, as jwst's steps read them (astropy's
    ``interpret_bit_flags``, whose import costs a run half a second): "OUTLIER, SATURATED",
    "OUTLIER+SATURATED", "18", 18, or "~DO_NOT_USE" (every bit but those named)."""
    if bits is None or (isinstance(bits, str) and not bits.strip()):
        return 0
    if not isinstance(bits, str):
        try:
            value, flipped = int(bits), False
        except (ValueError, TypeError) as error:
            raise CoronInputError(parameter, f"cannot read DQ bits {bits!r}: {error}") from None
    else:
        value, flipped = _expression(bits, parameter)
    if value < 0 and not flipped:
        raise CoronInputError(parameter, f"DQ bits {bits!r} are not a non-negative bit mask")
    return (~value if flipped else value) & 0xFFFFFFFF  # "~NAME": every bit but NAME


def _expression(bits: str, parameter: str) -> tuple[int, bool]:
    """(value, flipped) of a bit-mask expression: "~" flips the whole of what follows,
    optionally in parentheses; one kind of separator (",", "+" or "|") joins names, or
    joins integers that are single bits; a lone integer is taken as it is."""
    text = bits.strip()
    flipped = text.startswith("~")
    text = text.removeprefix("~").strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    separators = set(re.findall(r"[,+|]", text))
    if len(separators) > 1:
        raise CoronInputError(
            parameter, f"cannot read DQ bits {bits!r}: use one of ',', '+' or '|' between flags"
        )
    parts = [part.strip() for part in re.split(r"[,+|]", text)]
    if all(re.fullmatch(r"[+-]?\d+", part) for part in parts):
        numbers = [int(part) for part in parts]
        if len(numbers) > 1 and any(n <= 0 or n & (n - 1) for n in numbers):
            raise CoronInputError(
                parameter, f"cannot read DQ bits {bits!r}: a list of integers must be of bits"
            )
        value = 0
        for number in numbers:
            value |= number
        return (numbers[0] if len(numbers) == 1 else value), flipped
    value = 0
    for name in parts:
        if name not in PIXEL:
            raise CoronInputError(
                parameter,
                f"{bits!r}: no DQ flag is named {name!r}; give an integer or names of "
                f"jwst's pixel flags ({', '.join(list(PIXEL)[1:6])}, ...), joined by commas",
            )
        value |= PIXEL[name]
    return value, flipped
