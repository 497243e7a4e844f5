"""The command line: bad input gets one line naming the file and the problem, exit code 2,
and no product; good input lists the products."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from tests.conftest import run_main


def asn_of(folder):
    return next(folder.glob("*_asn.json"))


def members(folder, exptype):
    table = json.loads(asn_of(folder).read_text())
    return [
        folder / m["expname"] for m in table["products"][0]["members"] if m["exptype"] == exptype
    ]


def rewrite_members(folder, keep):
    path = asn_of(folder)
    table = json.loads(path.read_text())
    product = table["products"][0]
    product["members"] = [m for m in product["members"] if keep(m)]
    path.write_text(json.dumps(table))


def resize(path, ny, nx):
    with fits.open(path) as hdul:
        hdus = [fits.PrimaryHDU(header=hdul[0].header)]
        for name in ("SCI", "ERR", "DQ"):
            hdus.append(fits.ImageHDU(hdul[name].data[:, :ny, :nx], name=name))
    fits.HDUList(hdus).writeto(path, overwrite=True)


def damage(kind, folder):
    """Break the observation in ``folder``; return the file the error must name."""
    science, psf = members(folder, "science"), members(folder, "psf")
    if kind == "missing asn":
        return folder / "nothing_asn.json"
    if kind == "malformed asn":
        asn_of(folder).write_text('{"asn_id": "c1", "products": [')
        return asn_of(folder)
    if kind == "no science":
        rewrite_members(folder, lambda m: m["exptype"] != "science")
        return asn_of(folder)
    if kind == "no psf":
        rewrite_members(folder, lambda m: m["exptype"] != "psf")
        return asn_of(folder)
    if kind == "missing member":
        psf[1].unlink()
        return psf[1]
    if kind == "unreadable member":
        science[1].write_bytes(b"\0" * 5000)
        return science[1]
    if kind == "psf frames differ":
        resize(psf[2], 60, 64)
        return psf[2]
    if kind == "science frames differ":
        resize(science[0], 64, 60)
        return science[0]
    if kind == "wrong dimensionality":
        with fits.open(science[1]) as hdul:
            hdus = [hdul[0].copy()] + [
                fits.ImageHDU(hdul[n].data[0], name=n) for n in ("SCI", "ERR", "DQ")
            ]
        fits.HDUList(hdus).writeto(science[1], overwrite=True)
        return science[1]
    if kind == "psfmask shape":
        mask = folder / "psfmask.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.ones((32, 32)), name="SCI")]).writeto(
            mask, overwrite=True
        )
        return mask
    raise ValueError(kind)


CASES = {
    "missing asn": "not found",
    "malformed asn": "not valid JSON",
    "no science": "no science members",
    "no psf": "no psf members",
    "missing member": "file not found",
    "unreadable member": "not a readable FITS file",
    "psf frames differ": "frames are 60x64 pixels",
    "science frames differ": "frames are 64x60 pixels",
    "wrong dimensionality": "expected 3",
    "psfmask shape": "PSFMASK has shape",
}


@pytest.mark.parametrize("kind", CASES)
def test_bad_input_one_line_no_product(kind, observation_copy, tmp_path, capsys):
    named = damage(kind, observation_copy)
    asn = named if kind == "missing asn" else asn_of(observation_copy)
    out = tmp_path / "products"
    code, _, err = run_main(
        [
            "run",
            asn,
            "-o",
            out,
            "--psfmask",
            observation_copy / "psfmask.fits",
            "--scheduler",
            "synchronous",
        ],
        capsys,
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("coron-dask: error: ")
    assert str(named) in lines[0] and CASES[kind] in lines[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--truncate", "-1"),
        ("--truncate", "5,x"),
        ("--truncate", "5,-2"),
        ("--median-box-length", "-3"),
        ("--n-workers", "0"),
        ("--bad-bits", "NOT_A_FLAG"),
    ],
)
def test_bad_parameters(option, value, asn, tmp_path, capsys):
    code, _, err = run_main(
        ["run", asn, "-o", tmp_path / "out", option, value, "--scheduler", "synchronous"], capsys
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "error" in err and (option.lstrip("-").replace("-", "_") in err or option in err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_run_lists_products(asn, observation_dir, tmp_path, capsys):
    code, out, _ = run_main(
        [
            "run",
            asn,
            "-o",
            tmp_path,
            "--align-to",
            "first",
            "--psfmask",
            observation_dir / "psfmask.fits",
            "--scheduler",
            "synchronous",
        ],
        capsys,
    )
    assert code == 0
    listed = sorted(out.split())
    assert listed == sorted(str(p) for p in tmp_path.iterdir())
    assert len(listed) == 13  # 11 products, the detection map and the candidates


def test_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "coron_dask.cli", "run", str(tmp_path / "none_asn.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"coron-dask: error: {tmp_path / 'none_asn.json'}: "
        "association file not found"
    )


def test_impossible_plan_is_refused_before_any_task(tmp_path):
    """Workers too small for the frames and references: one line saying the minimum, exit 2,
    before the cluster computes anything, and no product."""
    from coron_dask.science.simulate import simulate

    asn = simulate(tmp_path / "in", size=256, sci_exps=1, sci_ints=2, psf_exps=2, psf_ints=30)
    out = tmp_path / "out"
    options = ["--n-workers", "1", "--memory-limit", "200MiB", "--stats", tmp_path / "stats.json"]
    result = subprocess.run(
        [sys.executable, "-m", "coron_dask.cli", "run", asn, "-o", out, *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "coron-dask: error: memory: 256x256 frames with 60 references need workers of at least "
    )
    assert "the workers have 0.20 GiB" in last
    assert not out.exists() or not any(out.iterdir())
    assert not (tmp_path / "stats.json").exists()  # nothing was computed


def test_run_in_process_never_imports_distributed(asn, observation_dir, tmp_path):
    """A run small enough to compute in its own process, every step and the detection map
    included, leaves distributed unimported (0.3-0.4 s of start-up a small run need not
    pay); with --n-workers it starts a LocalCluster, so distributed is there."""
    script = (
        "import sys\nfrom coron_dask.cli.main import main\ncode = main(sys.argv[1:])\n"
        "print('distributed' in sys.modules)\nsys.exit(code)"
    )
    mask = ["--psfmask", str(observation_dir / "psfmask.fits"), "--no-progress"]
    for extra, imported in (([], "False"), (["--n-workers", "1"], "True")):
        out = str(tmp_path / str(len(extra)))
        result = subprocess.run(
            [sys.executable, "-c", script, "run", str(asn), "-o", out, *mask, *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "_i2d" in result.stdout and "_candidates" in result.stdout
        assert result.stdout.split()[-1] == imported


#: A small observation for the demo: 64² frames, 18 references (the KL cutoffs 5 and 10).
DEMO = ["--size", "64", "--sci-ints", "3", "--psf-exps", "9", "--psf-ints", "2", "--seed", "4"]


def test_demo_with_several_kl_cutoffs(tmp_path, capsys):
    """The demo with a KL-mode cube (--truncate 5,10): exit 0, every product placed, and a
    report line per cutoff whose figures are measured against the injected truth: the
    companion found on the sky within 0.3 px of where it was put, stronger in the i2d
    than in the mean psfsub of either roll."""
    from coron_dask.science.photometry import companion_figures

    code, out, err = run_main(["demo", tmp_path / "demo", "--truncate", "5,10", *DEMO], capsys)
    assert code == 0, err
    products = tmp_path / "demo" / "products"
    listed = [Path(line.strip()) for line in out.splitlines() if line.startswith("  /")]
    assert {p.suffix for p in listed} == {".fits", ".ecsv"} and all(p.exists() for p in listed)
    assert {p.parent for p in listed} == {products} and len(listed) == 19
    truth = json.loads((tmp_path / "demo" / "inputs" / "truth.json").read_text())
    lines = [line for line in out.splitlines() if line.startswith("companion")]
    assert [line.split(":")[0] for line in lines] == ["companion (KL 5)", "companion (KL 10)"]
    for plane, line in enumerate(lines):
        numbers = [float(n) for n in re.findall(r"\d+\.\d+", line)]
        *rolls, i2d_snr, offset = numbers
        assert len(rolls) == 2 and min(rolls) > 3
        assert i2d_snr > max(rolls) and offset < 0.3
        figures = companion_figures(listed, truth, plane)  # what the line rounds
        assert rolls == [round(snr, 1) for snr in figures["rolls"]]
        assert offset == round(figures["i2d_offset"], 2)
    # the cutoffs measure different subtractions
    assert lines[0].split(":")[1] != lines[1].split(":")[1]


def test_demo_failing_after_its_run_says_its_products_are_on_disk(tmp_path, capsys, monkeypatch):
    """A failure after the run placed the products (here the quicklook) ends with a line
    that says they were written, and where, not that none was."""
    from coron_dask.cli import commands

    def broken(*args, **kwargs):
        raise RuntimeError("no figure")

    monkeypatch.setattr(commands, "_quicklook", broken)
    code, _, err = run_main(["demo", tmp_path / "demo", *DEMO], capsys)
    products = tmp_path / "demo" / "products"
    assert code == 1
    on_disk = sorted(products.iterdir())
    assert len(on_disk) == 19 and not any(p.name.startswith(".") for p in on_disk)
    assert err.strip().splitlines()[-1] == (
        f"coron-dask: error: unexpected RuntimeError: no figure; its {len(on_disk)} products "
        f"were written, in {products} (--debug shows where)"
    )
