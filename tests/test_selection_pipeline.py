"""References chosen per integration and zone (--maxnumbasis) through the pipeline: products
bit for bit the same whatever the blocks, the choice written in psfsub (REFS, REFCORR) and
opened with it, maxnumbasis not below the references today's products bit for bit, bad
values one line and exit 2 before anything is written; a reduction against pyKLIP's
klip_dataset with a PSFLibrary and maxnumbasis."""

from pathlib import Path

import dask
import numpy as np
import pytest
from astropy.io import fits

from coron_dask.cli.main import main
from coron_dask.io.backend import open_product
from tests.conftest import assert_same_products, run_main

ZONES = ["--annuli", "2", "--subsections", "2", "--iwa", "3", "--owa", "30"]
CHOICE = ["--maxnumbasis", "4", "--truncate", "2,4"]
#: (align_to, integrations per block, references per alignment block)
BLOCKS = [("each", 1, 1), ("each", 3, 6), ("first", 1, 1), ("first", 2, 4)]
KLIP_TILE = 6 * 64 * 4 * 5  # tiles of 5 rows


def _run(asn, mask, folder, *extra) -> None:
    args = ["run", asn, "-o", folder, "--psfmask", mask, *extra, "--scheduler", "synchronous"]
    assert main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def chosen(asn, observation_dir, tmp_path_factory) -> dict:
    """The products of each block shape of BLOCKS with 4 of the 6 references chosen."""
    out = {}
    with dask.config.set({"coron_dask.chunks.klip-tile": KLIP_TILE}):
        for mode, integrations, psfs in BLOCKS:
            folder = tmp_path_factory.mktemp(f"chosen_{mode}")
            blocks = ["--integrations-per-chunk", integrations, "--psfs-per-chunk", psfs]
            extra = ["--align-to", mode, *blocks, *ZONES, *CHOICE]
            _run(asn, observation_dir / "psfmask.fits", folder, *extra)
            out[mode, integrations, psfs] = folder
    return out


@pytest.mark.parametrize("blocks", [b for b in BLOCKS if b[1:] != (1, 1)], ids=str)
def test_products_with_a_choice_do_not_depend_on_the_blocks(blocks, chosen):
    assert_same_products(chosen[blocks], chosen[blocks[0], 1, 1])


@pytest.mark.parametrize("mode", ["each", "first"])
def test_the_choice_is_written_and_opened(mode, chosen):
    """psfsub's REFS and REFCORR (integration, zone, rank): 4 distinct references of the 6
    for each (integration, zone), most correlated first, and the header says MAXNBAS."""
    paths = sorted(chosen[mode, 1, 1].glob("*_psfsub.fits"))
    assert len(paths) == 2
    for path in paths:
        assert fits.getheader(path)["MAXNBAS"] == 4
        dataset = open_product(path)
        refs, corr = dataset["REFS"].values, dataset["REFCORR"].values
        assert dataset["REFS"].dims == ("integration", "zone", "rank")
        assert refs.shape == (3, 4, 4) and ((refs >= 0) & (refs < 6)).all()
        assert all(len(set(row)) == 4 for row in refs.reshape(-1, 4))
        assert (np.diff(corr, axis=-1) <= 0).all() and (np.abs(corr) <= 1).all()
        assert len({tuple(row) for row in refs.reshape(-1, 4)}) > 1  # a choice per zone


def test_the_written_choice_is_numpys_most_correlated(chosen, asn):
    """REFS and REFCORR against numpy: each integration's filled frame (the crfints' bad
    pixels filled, as klip's input) correlated on each zone's pixels with each reference
    of psfalign (written): the 4 largest, in order."""
    from coron_dask.io import open_exposure
    from coron_dask.pipeline.build import exposure_zones
    from coron_dask.pipeline.observation import open_association
    from coron_dask.steps.align_refs import median_replace_img

    folder = chosen["each", 1, 1]
    p = dict(annuli=2, subsections=2, annuli_spacing="constant", iwa=3.0, owa=30.0)
    for exposure in open_association(asn).science:
        root = Path(exposure.encoding["source"]).name.removesuffix("_calints.fits")
        zones = exposure_zones(exposure, p, logged=False)
        crfints = open_exposure(folder / f"{root}_c1000_crfints.fits")
        filled = median_replace_img(crfints, 3, "DO_NOT_USE")["sci"].values
        aligned = fits.getdata(folder / f"{root}_c1000_psfalign.fits", "SCI")
        written = open_product(folder / f"{root}_c1000_psfsub.fits")
        refs, corr = written["REFS"].values, written["REFCORR"].values
        for i in range(len(filled)):
            for z in range(zones.count):
                inside = zones.labels == z
                ours = [np.corrcoef(filled[i][inside], r[inside])[0, 1] for r in aligned[i]]
                order = np.argsort(ours)[::-1][:4]
                np.testing.assert_array_equal(refs[i, z], order)
                np.testing.assert_allclose(corr[i, z], np.array(ours)[order], rtol=1e-6)


def test_maxnumbasis_not_below_the_references_is_todays_products(asn, observation_dir, tmp_path):
    """--maxnumbasis 6 of 6 references (and more): every reference used, products bit for
    bit those of a run without it (no REFS, REFCORR), logged."""
    mask = observation_dir / "psfmask.fits"
    extra = [*ZONES, "--truncate", "2,4", "--skip", "resample"]
    _run(asn, mask, tmp_path / "none", *extra)
    for k in (6, 9):
        _run(asn, mask, tmp_path / f"k{k}", *extra, "--maxnumbasis", k)
        assert_same_products(tmp_path / f"k{k}", tmp_path / "none")
    for path in (tmp_path / "k6").glob("*_psfsub.fits"):
        with fits.open(path) as hdul:
            assert "REFS" not in hdul and hdul[0].header["MAXNBAS"] == 6


@pytest.mark.parametrize(
    "value, truncate, said",
    [("0", "2", "--maxnumbasis: must be >= 1"), ("3", "2,5", "--maxnumbasis: 3 ref")],
)
def test_bad_maxnumbasis_is_one_line_exit_2(value, truncate, said, asn, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", asn, "-o", out, "--maxnumbasis", value, "--truncate", truncate]
    code, _, err = run_main([*args, "--scheduler", "synchronous"], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if "maxnumbasis" in line]
    assert len(lines) == 1 and said in lines[0], err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("command", ["run", "demo", "contrast"])
def test_every_run_command_takes_maxnumbasis(command, capsys):
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0 and "--maxnumbasis" in out


def test_adi_rdi_chooses_among_the_references_movement_keeps(asn, observation_dir, tmp_path):
    """ADI+RDI with --maxnumbasis 7 of 9 references (6 of the reference star, the other
    roll's 3): in each (integration, zone) REFS is numpy's 7 most correlated of the
    references eligible there, an ADI one only where the roll moves a source at the zone's
    radius (the middle of its annulus) by at least --movement (2 r sin(Δroll/2), from
    psfalign's ALIGN table), so never one the movement leaves out; all of them, then −1,
    where fewer than 7 are eligible (the inner annulus: the reference star's 6)."""
    from coron_dask.io import open_exposure
    from coron_dask.pipeline.build import exposure_zones
    from coron_dask.pipeline.observation import open_association
    from coron_dask.steps.align_refs import median_replace_img

    movement, k = 2.0, 7
    zoning = dict(annuli=3, subsections=2, annuli_spacing="constant", iwa=0.0, owa=None)
    extra = ["--mode", "ADI+RDI", "--movement", movement, "--annuli", "3", "--subsections", "2"]
    extra += ["--maxnumbasis", k, "--truncate", "2,4", "--skip", "resample"]
    _run(asn, observation_dir / "psfmask.fits", tmp_path, *extra)
    sizes = set()
    for exposure in open_association(asn).science:
        root = Path(exposure.encoding["source"]).name.removesuffix("_calints.fits")
        zones = exposure_zones(exposure, zoning, logged=False)
        middles = np.repeat((zones.edges[:-1] + zones.edges[1:]) / 2, 2)
        crfints = open_exposure(tmp_path / f"{root}_c1000_crfints.fits")
        filled = median_replace_img(crfints, 3, "DO_NOT_USE")["sci"].values
        with fits.open(tmp_path / f"{root}_c1000_psfalign.fits") as hdul:
            aligned = hdul["SCI"].data
            align = hdul["ALIGN"].data
        roll = exposure["sci"].attrs["ROLL_REF"]
        refs = open_product(tmp_path / f"{root}_c1000_psfsub.fits")["REFS"].values
        assert refs.shape == (3, 6, k)
        for i in range(len(filled)):
            table = align[align["INTEGRATION"] == i + 1]
            adi = table["KIND"] == "ADI"
            turned = np.radians(np.abs(table["ROLL"] - roll))
            for z in range(zones.count):
                moved = 2 * middles[z] * np.sin(turned / 2)
                eligible = np.flatnonzero(~adi | (moved >= movement))
                inside = zones.labels == z
                corr = [
                    np.corrcoef(filled[i][inside], aligned[i, r][inside])[0, 1] for r in eligible
                ]
                best = eligible[np.argsort(corr, kind="stable")[::-1][:k]]
                expected = np.full(k, -1)
                expected[: len(best)] = best
                np.testing.assert_array_equal(refs[i, z], expected)
                assert not set(refs[i, z]) & set(np.flatnonzero(adi & (moved < movement)))
                sizes.add(len(eligible))
    assert sizes == {6, 9}  # zones with ADI left out (all 6 chosen) and with it (7 of 9)
