"""One parameter spec: dask's defaults, the command line's options, the Python API's checks
and the provenance keywords are made from it, and the API refuses what the command line
refuses, in one line naming the option as each spells it."""

from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
from astropy.io import fits

from coron_dask import run_coron3
from coron_dask.core import config, parameters
from coron_dask.core.errors import CoronInputError
from coron_dask.pipeline import provenance
from coron_dask.pipeline.run import check_execution
from coron_dask.runtime import deploy as cluster
from tests.conftest import run_main

pytest.importorskip("dask_jobqueue")  # its defaults in dask's configuration, as test_endings


def test_shipped_yaml_is_made_from_the_spec():
    shipped = Path(parameters.__file__).with_name("coron_dask.yaml")
    assert shipped.read_text() == config.yaml_text()  # python -m coron_dask.core.config
    assert yaml.safe_load(shipped.read_text()) == {"coron_dask": parameters.defaults()}


def test_defaults_are_those_shipped_before_the_spec():
    """The defaults coron_dask.yaml held, written out by hand."""
    assert parameters.defaults() == {
        "skip": [],
        "outlier_detection": {"snr": 5.0, "maskpt": 0.7, "good-bits": "~DO_NOT_USE"},
        "align_refs": {
            "align-to": "each",
            "median-box-length": 3,
            "bad-bits": "DO_NOT_USE",
            "psfmask": "crds",
        },
        "klip": {  # one zone, the whole frame: jwst's KLIP
            "truncate": 50,
            "annuli": 1,
            "subsections": 1,
            "annuli-spacing": "constant",
            "iwa": 0.0,
            "owa": None,
            "mode": "RDI",  # jwst's references: the reference star's
            "movement": 3.0,  # pyKLIP's default
            "maxnumbasis": None,  # every reference, as jwst
        },
        "resample": {"orientation": "detector"},
        "output": {"format": "fits", "psfalign": True},
        "chunks": {
            "integrations": None,
            "psfs": None,
            "outlier-rows": None,
            "klip-tile": "8 MiB",
            "memory-fraction": 0.65,
            "alignment-tasks-per-thread": 16,
            "alignment-block-least": "32 MiB",
        },
        "cluster": {
            "n-workers": None,
            "in-process-below": "1 GiB",
            "threads-per-worker": 1,
            "memory-limit": "auto",
            "dashboard-address": "127.0.0.1:8787",
            "wait-for-workers": 1,
            "worker-timeout": 600,
            "scheduler-timeout": 60,
            "status-interval": 30,
            "cancel-timeout": 20,
        },
        "contrast": {"transmission-max": 1.5},
        "companions": {  # the fit's model, noise and sampler (lengths in λ/D)
            "psf-half-width": 8.0,
            "window-margin": 1.0,
            "align-slack": 1.0,
            "stamp-radius": 2.0,
            "annulus-width": 2.0,
            "noise-mask": 2.0,
            "correlation-lag": 3.0,
            "kernel": "matern32",
            "walkers": 32,
            "check-steps": 500,
            "max-steps": 20000,
            "tau-factor": 50,
            "tau-change": 0.05,
            "burn-factor": 5,
            "walker-spread": 0.5,
            "spread-walkers": True,
            "seed": 1,
            "min-snr": 5.0,  # the candidates `coron-dask companions --candidates` fits
        },
    }


def test_provenance_keywords_are_those_products_carry():
    """The keywords, comments and order of the headers written before the spec."""
    assert list(provenance.PARAMETERS.items()) == [
        ("skip", ("SKIP", "steps skipped")),
        ("snr", ("OUTL_SNR", "outlier_detection snr")),
        ("maskpt", ("MASKPT", "outlier_detection maskpt")),
        ("good_bits", ("GOODBITS", "outlier_detection good_bits")),
        ("align_to", ("ALIGN_TO", "align_refs: to each or the first integration")),
        ("median_box_length", ("MEDBOXLN", "align_refs median_box_length")),
        ("bad_bits", ("BAD_BITS", "align_refs bad_bits")),
        ("truncate", ("TRUNCATE", "klip truncate: KL modes kept")),
        ("annuli", ("ANNULI", "klip: annuli about the star")),
        ("subsections", ("SUBSECTS", "klip: subsections of each annulus")),
        ("annuli_spacing", ("ANNSPACE", "klip: annuli spacing")),
        ("iwa", ("IWA", "klip: inner working angle (pixels)")),
        ("owa", ("OWA", "klip: outer working angle (pixels)")),
        ("mode", ("KLIPMODE", "klip: references RDI, ADI or ADI+RDI")),
        ("movement", ("MOVEMENT", "klip: least ADI movement (pixels)")),
        ("maxnumbasis", ("MAXNBAS", "klip: references kept per integration and zone")),
        ("orientation", ("ORIENT", "resample: i2d grid orientation")),
        ("save_psfalign", ("PSFALIGN", "psfalign products written")),
    ]


def test_help_shows_the_configured_default(capsys):
    with dask.config.set({"coron_dask.klip.truncate": 7}):
        code, out, _ = run_main(["run", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "per cutoff from one basis (default: 7)" in text
    assert "box of the bad-pixel median fill (jwst's default) (default: 3)" in text
    assert "LocalCluster worker processes (default: one per CPU of the allocation)" in text


def test_contrast_offers_no_psfalign_option(asn, tmp_path, capsys):
    """A contrast run writes no psfalign: --no-psfalign is refused, not ignored."""
    args = ["contrast", asn, "--offaxis-psf", tmp_path / "psf.fits", "--no-psfalign"]
    code, _, err = run_main(args, capsys)
    assert code == 2 and "unrecognized arguments: --no-psfalign" in err


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ({"snr": -1.0}, "must be > 0, got -1.0"),
        ({"maskpt": 2}, "must be <= 1, got 2"),
        ({"median_box_length": 2.5}, "must be a whole number, got 2.5"),
        ({"save_psfalign": "yes"}, "must be True or False, got 'yes'"),
        ({"psfs": 0}, "must be >= 1, got 0"),
        ({"orientation": "east"}, "must be 'detector' or 'north', got 'east'"),
        ({"skip": ["klip"]}, "steps ['klip'] cannot be skipped"),
        ({"truncate": "5,x"}, "must be whole numbers separated by commas, got '5,x'"),
        ({"annuli_spacing": "cubic"}, "must be one of 'constant', 'linear', 'log', got 'cubic'"),
        ({"iwa": -1.5}, "must be >= 0, got -1.5"),
        ({"owa": 0}, "must be > 0, got 0"),
    ],
)
def test_each_bad_value_is_one_error_naming_it(given, problem):
    with pytest.raises(CoronInputError) as error:
        config.resolve_parameters(**given)
    assert str(error.value) == f"{next(iter(given))}: {problem}"


def test_values_read_as_the_command_line_gives_them():
    resolved = config.resolve_parameters(truncate="20,5,5", median_box_length="4", snr=4)
    assert resolved["truncate"] == (5, 20)
    assert resolved["median_box_length"] == 4
    assert resolved["snr"] == 4 and isinstance(resolved["snr"], int)  # as given: its header


@pytest.fixture
def no_cluster(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started")

    monkeypatch.setattr(cluster.Cluster, "__init__", refuse)


#: Each refusal of the command line (its options) and its twin in Python (keywords of
#: run_coron3): the option both name, each in its own words, and the problem.
TWINS = [
    (
        ["--memory-limit", "lots"],
        {"memory_limit": "lots"},
        "memory_limit",
        "cannot read 'lots' as a size",
    ),
    (["--memory-limit", "0"], {"memory_limit": "0"}, "memory_limit", "must be more than 0"),
    (
        ["--memory-limit", "100TiB", "--n-workers", "4"],
        {"memory_limit": "100TiB", "n_workers": 4},
        "memory_limit",
        "4 worker(s) × 100TiB is more than the ",
    ),
    (["--n-workers", "0"], {"n_workers": 0}, "n_workers", "must be >= 1, got 0"),
    (
        ["--scheduler", "threads", "--report", "r.html"],
        {"scheduler": "threads", "report": "r.html"},
        "report",
        "performance report needs a distributed cluster",
    ),
    (
        ["--scheduler", "synchronous", "--n-workers", "4"],
        {"scheduler": "synchronous", "n_workers": 4},
        "n_workers",
        "sizes the LocalCluster coron-dask starts",
    ),
    (
        ["--scheduler", "tcp://127.0.0.1:1", "--memory-limit", "2GiB"],
        {"scheduler": "tcp://127.0.0.1:1", "memory_limit": "2GiB"},
        "memory_limit",
        "sizes the LocalCluster coron-dask starts",
    ),
    (["--jobs", "2"], {"jobs": 2}, "jobs", "sizes batch jobs of"),
    (["--adapt", "1:3"], {"adapt": (1, 3)}, "adapt", "sizes batch jobs of"),
    (
        ["--cluster", "slurm", "--adapt", "3:2"],
        {"kind": "slurm", "adapt": (3, 2)},
        "adapt",
        "expected 1 <= MIN <= MAX",
    ),
    (
        ["--wait-for-workers", "2"],
        {"wait_for_workers": 2},
        "wait_for_workers",
        "has its workers when it starts",
    ),
    (
        ["--scheduler", "threads", "--wait-for-workers", "2"],
        {"scheduler": "threads", "wait_for_workers": 2},
        "wait_for_workers",
        "has no workers to wait for",
    ),
    (
        ["--scheduler", "tcp://127.0.0.1:1", "--scheduler-file", "s.json"],
        {"scheduler": "tcp://127.0.0.1:1", "scheduler_file": "s.json"},
        "scheduler_file",
        "not both",
    ),
    (
        ["--scheduler", "tcp://127.0.0.1:1", "--cluster", "pbs"],
        {"scheduler": "tcp://127.0.0.1:1", "kind": "pbs"},
        "kind",
        "starts its own scheduler",
    ),
    (
        ["--median-box-length", "-3"],
        {"median_box_length": -3},
        "median_box_length",
        "must be >= 0, got -3",
    ),
    # jwst takes 0 (no KL mode: the psfsub is the science frame itself); coron-dask refuses it
    (["--truncate", "5,-2"], {"truncate": "5,-2"}, "truncate", "KL mode counts >= 1"),
    (["--truncate", "0"], {"truncate": 0}, "truncate", "KL mode counts >= 1 (0 keeps none), got 0"),
    (["--truncate", "5,0"], {"truncate": (5, 0)}, "truncate", ">= 1 (0 keeps none), got 5,0"),
    # KLIP's zones: read as the options are, then checked against the frames' geometry
    (["--annuli", "0"], {"annuli": 0}, "annuli", "must be >= 1, got 0"),
    (["--subsections", "-2"], {"subsections": -2}, "subsections", "must be >= 1, got -2"),
    (
        ["--iwa", "5", "--owa", "3"],
        {"iwa": 5, "owa": 3},
        "owa",
        "must be above the iwa (5 px), got 3",
    ),
    (["--iwa", "100"], {"iwa": 100}, "iwa", "100 px leaves no pixel of jw01386001001_03106_00001"),
    (["--annuli", "60"], {"annuli": 60}, "annuli", "px are narrower than a pixel: ask for fewer"),
]


@pytest.mark.parametrize(("options", "keywords", "keyword", "problem"), TWINS)
def test_the_api_refuses_what_the_command_line_refuses(
    options, keywords, keyword, problem, asn, observation_dir, tmp_path, capsys, no_cluster
):
    flag = parameters.BY_NAME[keyword].flag
    mask = observation_dir / "psfmask.fits"
    out = tmp_path / "out"
    code, _, err = run_main(["run", asn, "-o", out, "--psfmask", mask, *options], capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and flag in err and problem in err, err
    with pytest.raises(CoronInputError) as error:
        run_coron3(asn, out, psfmask=mask, **keywords)
    assert "\n" not in str(error.value) and problem in error.value.problem
    assert error.value.source.split("=")[0] == keyword  # kind='pbs': kind, as set
    assert not out.exists()


def test_n_workers_with_a_local_scheduler_is_refused_from_python(asn, tmp_path, no_cluster):
    with pytest.raises(CoronInputError) as error:
        run_coron3(asn, tmp_path / "out", scheduler="synchronous", n_workers=4)
    assert str(error.value) == (
        "n_workers: sizes the LocalCluster coron-dask starts; with "
        "scheduler='synchronous' the workers are sized where they are started"
    )


def test_options_that_a_client_under_way_would_ignore_are_refused():
    with pytest.raises(CoronInputError) as error:
        check_execution(client=object(), n_workers=2)
    assert str(error.value) == "n_workers: cannot go with a client under way: it is used as it is"


def test_contrast_curve_refuses_what_run_coron3_refuses(asn, observation_dir, tmp_path):
    from coron_dask import contrast_curve

    offaxis = tmp_path / "psf.fits"
    fits.PrimaryHDU(np.ones((9, 9), np.float32)).writeto(offaxis)
    with pytest.raises(CoronInputError) as error:
        contrast_curve(
            asn,
            tmp_path / "out",
            offaxis_psf=offaxis,
            psfmask=observation_dir / "psfmask.fits",
            execution={"scheduler": "threads", "wait_for_workers": 2},
        )
    assert error.value.source == "wait_for_workers"
    assert "scheduler='threads' has no workers to wait for" in error.value.problem
