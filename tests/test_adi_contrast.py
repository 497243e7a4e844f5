"""The contrast curve with ADI: an injected companion is in the ADI references too (the
other roll's integrations carry it, turned with the sky), so each injected set is reduced
on bases of its own, made from psfalign plus the companions moved by the same fitted
shifts. Checked against the injected frames themselves filled and moved by those fits; and
bit for bit the same whatever the blocks, companions dimmed by a transmission map."""

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from astropy.io import fits

from coron_dask.io import Extension, Product, write_products
from coron_dask.pipeline.build import reduce_observation
from coron_dask.science.geometry import star_position
from coron_dask.science.injection import (
    Companion,
    _injected,
    detector_places,
    injected_psfsubs,
    read_offaxis_psf,
    roll_transmissions,
)
from coron_dask.science.transmission import Transmission
from coron_dask.steps.align_refs import median_replace_img
from coron_dask.steps.blocks import shift_block
from coron_dask.steps.klip import klip

TRUNCATE = (2, 4)


@pytest.mark.parametrize("align_to", ["each", "first"])
def test_adi_injections_are_the_injected_frames_moved_by_the_same_fits(asn, tmp_path, align_to):
    """ADI+RDI in 2 annuli: each injected set's psfsub is the KLIP of the injected science
    on references made of the reference star's aligned frames and the other roll's injected
    integrations, filled and moved by psfalign's fits (1e-4 of the companions' signal); a
    set of zero flux gives the science psfsub (to float32 rounding)."""
    reduction = reduce_observation(
        asn,
        tmp_path,
        psfmask="none",
        truncate=TRUNCATE,
        mode="ADI+RDI",
        annuli=2,
        movement=1.0,
        align_to=align_to,
    )
    p = reduction.parameters
    psf = read_offaxis_psf(asn.parent / "offaxis_psf.fits")
    star = star_position(reduction.science[0].attrs, asn)
    members = [Companion(0, s, 60.0 + 180.0 * i, 3e-3) for i, s in enumerate((0.5, 1.0))]
    subs, _ = injected_psfsubs(reduction, psf, members, star)
    zero = [Companion(0, c.separation, c.position_angle, 0.0) for c in members]
    unchanged, _ = injected_psfsubs(reduction, psf, zero, star)
    made = [
        Product(tmp_path / f"{kind}{k}.fits", {}, [Extension("SCI", sub["sci"].data)])
        for kind, psfsubs in (("injected", subs), ("zero", unchanged))
        for k, sub in enumerate(psfsubs)
    ]
    paths = write_products([*reduction.products, *made], None)
    places = detector_places(reduction.science, members, star)
    fluxes = np.array([c.contrast for c in members])
    filled = [
        median_replace_img(_injected(e, x, fluxes, psf, alone=False), 3, p["bad_bits"])
        for e, x in zip(reduction.science, places, strict=True)
    ]
    written = {
        kind: sorted(x for x in paths if f"_{kind}" in x.name) for kind in ("psfalign", "psfsub")
    }
    with dask.config.set(scheduler="synchronous"):
        for k, psfalign in enumerate(reduction.psfaligns):
            # the other roll's injected integrations, filled, moved by the same fits
            first = int((psfalign["psf_kind"].values == "RDI").sum())
            with fits.open(written["psfalign"][k]) as hdul:
                aligned = hdul["SCI"].data.astype(np.float32)
                table = hdul["ALIGN"].data
            shifts = np.stack([table[c] for c in ("DX", "DY", "BETA", "CONVERGED")], axis=-1)
            shifts = shifts.reshape(*aligned.shape[:-2], 4)[..., first:, :]
            other = np.concatenate([f["sci"].values for j, f in enumerate(filled) if j != k])
            aligned[..., first:, :, :] = shift_block(other, shifts)
            references = xr.Dataset({"sci": (psfalign["sci"].dims, da.from_array(aligned))})
            basis = reduction.bases[k]
            chosen = basis.chosen.compute()
            expected = klip(filled[k], references, TRUNCATE, zones=basis.zones, chosen=chosen)
            expected = expected["sci"].values
            ours = fits.getdata(tmp_path / f"injected{k}.fits", "SCI")
            science = fits.getdata(written["psfsub"][k], "SCI")
            signal = np.nanmax(np.abs(expected - science))
            assert signal > 0
            assert np.nanmax(np.abs(ours - expected)) < 1e-4 * signal
            np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
            np.testing.assert_allclose(
                fits.getdata(tmp_path / f"zero{k}.fits", "SCI"),
                science,
                rtol=0,
                atol=1e-5 * np.nanmax(np.abs(science)),
            )


#: (integrations, references per alignment block): small blocks, and the plan's (2
#: integrations × all 9 references); KLIP tiles of 16 rows in both, cutting the zones (the
#: tile's rows are part of the numerics, recorded as KLIPROWS: the same in both).
SHAPES = ((1, 2), (None, None))
KLIP_TILE = 9 * 64 * 4 * 16


def test_adi_injections_through_a_transmission_do_not_depend_on_the_blocks(asn, tmp_path):
    """ADI+RDI in 2 annuli with a choice of references, the companions dimmed by a
    transmission map (falling across the frame, so each roll dims them differently): the
    contrast curve's injected psfsubs (what its i2d drizzles) are bit for bit the same for
    blocks of one integration × 2 references and for the planned blocks."""
    ramp = np.tile(np.linspace(0.2, 1.0, 64), (64, 1))
    transmission = Transmission(ramp, "a ramp in x")
    written = {}
    for integrations, psfs in SHAPES:
        folder = tmp_path / f"blocks-{integrations}-{psfs}"
        with dask.config.set({"coron_dask.chunks.klip-tile": KLIP_TILE}):
            reduction = reduce_observation(
                asn,
                folder,
                psfmask="none",
                truncate=TRUNCATE,
                mode="ADI+RDI",
                annuli=2,
                movement=1.0,
                maxnumbasis=6,
                integrations=integrations,
                psfs=psfs,
                save_psfalign=False,  # as a contrast curve: a scratch file of psfalign's SCI
                skip=("resample",),
            )
        assert reduction.plan.klip_rows == 16
        psf = read_offaxis_psf(asn.parent / "offaxis_psf.fits")
        star = star_position(reduction.science[0].attrs, asn)
        members = [Companion(0, s, 60.0 + 180.0 * i, 3e-3) for i, s in enumerate((0.5, 1.0))]
        dimmed = roll_transmissions(reduction.science, members, star, transmission)
        assert np.ptp(dimmed) > 0.05  # each roll and place dims its own
        subs, _ = injected_psfsubs(reduction, psf, members, star, transmission)
        made = [
            Product(folder / f"injected{k}.fits", {}, [Extension("SCI", sub["sci"].data)])
            for k, sub in enumerate(subs)
        ]
        with dask.config.set(scheduler="synchronous"):
            write_products([*reduction.products, *made], None)
        chunks = reduction.psfsubs[0]["sci"].data.chunks
        written[chunks] = [fits.getdata(product.path, "SCI") for product in made]
        science = [fits.getdata(path, "SCI") for path in sorted(folder.glob("*_psfsub.fits"))]
        for ours, plain in zip(written[chunks], science, strict=True):
            assert np.nanmax(np.abs(ours - plain)) > 1e-3 * np.nanmax(np.abs(plain))
    assert len(written) == 2  # two block shapes
    first, second = written.values()
    for ours, theirs in zip(first, second, strict=True):
        np.testing.assert_array_equal(ours, theirs)
