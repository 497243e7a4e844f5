"""DQ bit-mask expressions read as jwst's steps read them (astropy's interpret_bit_flags)."""

import pytest
from astropy.nddata.bitmask import interpret_bit_flags

from coron_dask.core.dqflags import PIXEL, bit_value
from coron_dask.core.errors import CoronInputError

EXPRESSIONS = [
    "18",
    " 16 ",
    "0",
    18,
    0,
    "DO_NOT_USE",
    "~DO_NOT_USE",
    "~DO_NOT_USE,SATURATED",
    "~(DO_NOT_USE+SATURATED)",
    "DO_NOT_USE, SATURATED",
    "OUTLIER|HOT|REFERENCE_PIXEL",
    "1,2",
    "(4,8)",
    " ~ 4",
    "~(4)",
    "~0",
]
REFUSED = ["do_not_use", "1,3", "DO_NOT_USE+2", "1,2+4", ",", "DO_NOT_USE,,SATURATED", "0x10"]


@pytest.mark.parametrize("bits", EXPRESSIONS)
def test_bits_as_astropy_reads_them(bits):
    assert bit_value(bits) == interpret_bit_flags(bits, flag_name_map=PIXEL) & 0xFFFFFFFF


@pytest.mark.parametrize("bits", REFUSED)
def test_what_astropy_refuses_is_refused_in_one_line(bits):
    with pytest.raises((KeyError, ValueError)):
        interpret_bit_flags(bits, flag_name_map=PIXEL)
    with pytest.raises(CoronInputError, match=r"^bad_bits: .*" + bits[:2].replace("(", r"\(")):
        bit_value(bits)


@pytest.mark.parametrize("bits", [-1, "-4"])
def test_negative_masks_are_refused_unless_flipped(bits):
    with pytest.raises(CoronInputError, match="not a non-negative bit mask"):
        bit_value(bits)
