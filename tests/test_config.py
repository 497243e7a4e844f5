"""coron-dask's defaults live in dask's configuration and are overridden the dask way."""

import os
import subprocess
import sys

import dask
import pytest

from coron_dask.core import config
from coron_dask.core.config import resolve_parameters
from coron_dask.core.errors import CoronInputError


def test_shipped_defaults_are_jwsts():
    resolved = resolve_parameters()
    assert resolved["truncate"] == 50
    assert resolved["median_box_length"] == 3
    assert resolved["bad_bits"] == "DO_NOT_USE"
    assert resolved["align_to"] == "each"
    assert config.get("cluster.dashboard-address").startswith("127.0.0.1:")


def test_dask_config_overrides_and_arguments_win():
    with dask.config.set({"coron_dask.klip.truncate": 7}):
        assert resolve_parameters()["truncate"] == 7
        assert resolve_parameters(truncate=3)["truncate"] == 3


def test_environment_variable_overrides():
    code = "from coron_dask.core.config import resolve_parameters as r; print(r()['truncate'])"
    env = {**os.environ, "DASK_CORON_DASK__KLIP__TRUNCATE": "20"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "20"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("klip.truncate", -1, "truncate"),
        ("align_refs.align-to", "middle", "align_to"),
        ("output.format", "hdf5", "format"),
        ("align_refs.bad-bits", "NOPE", "bad_bits"),
    ],
)
def test_bad_configured_values_are_named(key, value, message):
    with dask.config.set({f"coron_dask.{key}": value}), pytest.raises(CoronInputError) as error:
        resolve_parameters()
    assert error.value.source == message


def test_a_single_step_to_skip_may_be_a_string():
    assert resolve_parameters(skip="resample")["skip"] == ("resample",)
    with dask.config.set({"coron_dask.skip": "outlier_detection"}):
        assert resolve_parameters()["skip"] == ("outlier_detection",)
