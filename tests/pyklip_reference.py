"""pyKLIP as the tests' independent reference: its ``klip_math`` on one zone's pixels, and
its ``klip_dataset`` run the one way the tests compare with (one thread, float64, not
derotated, correlations not smoothed) on frames both get."""

import ctypes

import numpy as np
from pyklip import klip as pyklip
from pyklip import parallelized, rdi
from pyklip.instruments.Instrument import GenericData


def relative(ours: np.ndarray, theirs: np.ndarray) -> float:
    """‖ours − theirs‖ / ‖theirs‖."""
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def pyklip_zone(target, refs, labels, z, cutoffs) -> tuple[np.ndarray, np.ndarray]:
    """pyKLIP's subtraction (len(cutoffs), n) of a target on zone ``z`` and the deviation
    of the references' own residuals (len(cutoffs), n), float64 of the float32 frames."""
    inside = labels == z
    sci = target[inside].astype(np.float64)
    zone_refs = refs[:, inside].astype(np.float64)
    numbasis = np.array(cutoffs)
    sub = pyklip.klip_math(sci, zone_refs, numbasis).T
    own = np.stack([pyklip.klip_math(ref, zone_refs, numbasis).T for ref in zone_refs])
    return sub, own.std(axis=0)


def pyklip_inputs(
    frames: np.ndarray,
    library_frames: np.ndarray,
    star,
    zoning: dict,
    parangs: np.ndarray | None = None,
    correlation_zone: np.ndarray | None = None,
) -> tuple[GenericData, rdi.PSFLibrary]:
    """The science ``frames`` as pyKLIP's GenericData (the star at ``star``, ``parangs``
    for ADI, zoning's IWA and OWA) and a PSFLibrary of the science frames then
    ``library_frames``, prepared for the dataset. Its correlations are pyKLIP's own over
    ``correlation_zone`` (0 where it correlates, NaN elsewhere) or, without one, unused."""
    m, npsf = len(frames), len(library_frames)
    names = [f"sci{i}" for i in range(m)]
    extra = {} if parangs is None else {"parangs": parangs}
    dataset = GenericData(
        frames, np.tile(star, (m, 1)), IWA=zoning["iwa"], filenames=names, **extra
    )
    dataset.OWA = zoning["owa"]
    library = rdi.PSFLibrary(
        np.concatenate([frames, library_frames]),
        star,
        names + [f"ref{j}" for j in range(npsf)],
        compute_correlation=False,
        correlation_matrix=np.eye(m + npsf),
    )
    if correlation_zone is not None:
        library._compute_correlation(force=True, mask=correlation_zone)
    library.prepare_library(dataset)
    return dataset, library


def klip_dataset_psfsub(dataset, outputdir, zoning: dict, numbasis, **options) -> np.ndarray:
    """pyKLIP's ``klip_dataset`` on ``dataset`` in the zones of ``zoning`` (annuli,
    subsections, annuli_spacing), run the one way the tests compare with (one thread, in
    float64, not derotated, correlations not smoothed; ``options``: mode, fileprefix,
    maxnumbasis, psf_library, movement…): its psfsub (kl, integration, y, x)."""
    parallelized.klip_dataset(
        dataset,
        outputdir=str(outputdir),
        annuli=zoning["annuli"],
        subsections=zoning["subsections"],
        annuli_spacing=zoning["annuli_spacing"],
        numbasis=list(numbasis),
        corr_smooth=0,
        numthreads=1,
        skip_derot=True,
        dtype=ctypes.c_double,
        verbose=False,
        **options,
    )
    return dataset.output[:, :, 0]  # (kl, integration, wavelength, y, x)
