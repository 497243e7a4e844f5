"""calwebb_coron3 done with jwst 3.0.0's own functions, fed float64: the oracle of the
pipeline tests. jwst's data models and step functions do the work; only the per-integration
loop of the 4-D mode (which jwst >= 1.16 no longer has) is spelled out here."""

import json
from pathlib import Path

import numpy as np
from jwst.coron import imageregistration, klip
from jwst.coron.median_replace_img import median_replace_img
from jwst.coron.stack_refs import make_cube
from jwst.outlier_detection.coron import detect_outliers
from stdatamodels.jwst import datamodels


def fill(model, box: int) -> None:
    """jwst's median_replace_img, in place, with windows at the image edge cut at the edge.

    jwst's windows for the first box//2 rows and columns are empty (a negative slice
    start), so it writes 0 there; coron-dask deliberately takes the cut window. Padding
    the top and left with flagged pixels lets jwst's own function compute that.
    """
    half = int(box / 2)
    pad = ((0, 0), (half, 0), (half, 0))
    data = np.pad(model.data, pad, constant_values=np.nan)
    dq = np.pad(model.dq, pad, constant_values=1)
    padded = datamodels.CubeModel(data=data, dq=dq)
    padded.meta.instrument.name = model.meta.instrument.name
    median_replace_img(padded, box, 1)
    model.data[...] = padded.data[:, half:, half:]


def flag(model):
    """jwst's coronagraphic outlier_detection with the pipeline's parameters, in place."""
    return detect_outliers(model, False, "~DO_NOT_USE", 0.7, 5.0, None)


def coron3(
    asn: Path, psfmask: Path, align_to: str, truncate: int = 50, box: int = 3, outliers=True
) -> dict:
    """psfstack, and per science exposure root: psfalign SCI/ERR, psfsub SCI/ERR/DQ, shifts.

    With ``outliers``, every exposure goes through outlier_detection first, as in the pipeline.
    """
    table = json.loads(asn.read_text())
    members = table["products"][0]["members"]
    paths = {
        kind: [asn.parent / m["expname"] for m in members if m["exptype"] == kind]
        for kind in ("science", "psf")
    }
    prepare = flag if outliers else (lambda model: model)
    psf_stack = make_cube([prepare(datamodels.open(p)) for p in paths["psf"]])
    result = {"psfstack": {k: getattr(psf_stack, k).copy() for k in ("data", "err", "dq")}}
    mask = datamodels.open(psfmask).data.astype(np.float64)
    # coron-dask also fills ERR (jwst's shifted ERR is all NaN): the same fill, on ERR
    err_stack = datamodels.CubeModel(data=psf_stack.err.copy(), dq=psf_stack.dq.copy())
    err_stack.data[np.isnan(psf_stack.data)] = np.nan
    err_stack.meta.instrument.name = psf_stack.meta.instrument.name
    fill(psf_stack, box)
    fill(err_stack, box)
    refs = psf_stack.data.astype(np.float64)
    ref_err = err_stack.data.astype(np.float64)
    for path in paths["science"]:
        target = prepare(datamodels.open(path))
        fill(target, box)
        science = target.data.astype(np.float64)
        frames = science[:1] if align_to == "first" else science
        shifts = np.array(
            [
                [imageregistration.align_fourier_lsq(frame, ref, mask) for ref in refs]
                for frame in frames
            ]
        )
        sci = np.array([imageregistration.fourier_imshift(refs, -s) for s in shifts])
        err = np.array([imageregistration.fourier_imshift(ref_err, -s) for s in shifts])
        sci, err = sci.astype(np.float32), err.astype(np.float32)
        psfsub_sci, psfsub_err = [], []
        for i in range(len(science)):
            aligned = sci[0] if align_to == "first" else sci[i]
            one = datamodels.CubeModel(data=target.data[i : i + 1].copy())
            klip.klip(one, datamodels.CubeModel(data=aligned), truncate, return_psf=False)
            psfsub_sci.append(one.data[0])
            psfsub_err.append(one.err[0])
        root = path.name.removesuffix("_calints.fits")
        result[root] = {
            "psfalign_sci": sci[0] if align_to == "first" else sci,
            "psfalign_err": err[0] if align_to == "first" else err,
            "psfsub_sci": np.array(psfsub_sci),
            "psfsub_err": np.array(psfsub_err),
            "psfsub_dq": target.dq.copy(),
            "shifts": shifts,
        }
    return result
