"""Words in the names of dask layers that dask keeps: ``dask.utils.key_split`` (the
dashboard's task groups, and the names of the tasks dask fuses) stops at the first word
that is not letters only, so a product kind with a digit (``i2d``) is spelled there with
its digits as capitalised words (``iTwod``), and read back where the names are read."""

import re

DIGITS = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")
_SPELLED = re.compile("|".join(DIGITS))


def layer_word(word: str) -> str:
    """``word`` (lower case) in letters only, as a layer's name carries it: "i2d" → "iTwod"."""
    return "".join(DIGITS[int(c)] if c.isdigit() else c for c in word)


def word_of(spelled: str) -> str:
    """The word ``layer_word`` spelled: "iTwod" → "i2d"."""
    return _SPELLED.sub(lambda match: str(DIGITS.index(match.group())), spelled)
