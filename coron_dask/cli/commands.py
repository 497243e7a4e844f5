"""What each ``coron-dask`` command does: run, contrast, companions, cluster, plot, simulate,
demo."""

import argparse
import json
from pathlib import Path

from coron_dask.cli.options import given
from coron_dask.core.errors import CoronInputError, record_on_disk
from coron_dask.core.parameters import BY_NAME
from coron_dask.io import resume
from coron_dask.pipeline.run import check_execution, check_output_dir, run_coron3
from coron_dask.runtime.jobqueue import jobqueue_cluster
from coron_dask.science.simulate import simulate as simulated


def _run(args: argparse.Namespace, asn: Path, output_dir: Path) -> list[Path]:
    """run_coron3 with the command line's options, checked as the command line names them."""
    execution = given(args, args.command, "execution")
    check_execution(cli=True, **execution)
    parameters = given(args, args.command, "step")
    fitted = _session_companions(args) if args.command == "run" else None
    return run_coron3(
        asn, output_dir, psfmask=args.psfmask, companions=fitted, **execution, **parameters
    )


def _session_companions(args: argparse.Namespace) -> object | None:
    """``run --companions``' request (``companion_session.SessionCompanions``), or None;
    its options without --companions are refused, never ignored."""
    asked = {**given(args, "run", "injection"), **given(args, "run", "companion")}
    if not asked.pop("companions"):
        extra = [n for n, v in asked.items() if v not in (None, BY_NAME[n].default)]
        if extra:
            raise CoronInputError(extra[0], "fits companions: it goes with --companions")
        return None
    if asked["offaxis_psf"] is None:
        raise CoronInputError("companions", "needs the star's off-axis PSF: --offaxis-psf FILE")
    # astropy.wcs, emcee: only for companions
    from coron_dask.pipeline.companion_session import FitSettings, SessionCompanions

    sampler = {k: asked.pop(k) for k in ("walkers", "max_steps", "seed")}
    return SessionCompanions(
        cutoff=asked.pop("kl"),
        settings=FitSettings.configured(**{k: v for k, v in sampler.items() if v is not None}),
        **{name: value for name, value in asked.items() if value is not None},
    )


def run(args: argparse.Namespace) -> None:
    for path in _run(args, args.asn, args.output_dir):
        print(path)


def contrast(args: argparse.Namespace) -> None:
    """contrast_curve with the command line's options."""
    from coron_dask.pipeline.contrast import contrast_curve  # astropy.wcs (and .coordinates)

    execution = given(args, "contrast", "execution")
    check_execution(cli=True, **execution)
    paths = contrast_curve(
        args.asn,
        args.output_dir,
        psfmask=args.psfmask,
        execution=execution,
        **given(args, "contrast", "injection"),
        **given(args, "contrast", "step"),
    )
    for path in paths:
        print(path)


def companions(args: argparse.Namespace) -> None:
    """measure_companions with the command line's options."""
    from coron_dask.pipeline.companion_starts import requested_guesses
    from coron_dask.pipeline.companions import measure_companions
    from coron_dask.science.companion_fit import FitSettings

    execution = given(args, "companions", "execution")
    check_execution(cli=True, **execution)
    asked = given(args, "companions", "companion")
    guesses = requested_guesses(
        asked.pop("at"), asked.pop("candidates"), asked.pop("min_snr"), asked.get("kl")
    )
    sampler = {k: asked.pop(k) for k in ("walkers", "max_steps", "seed")}
    _, paths = measure_companions(
        args.asn,
        args.output_dir,
        psfmask=args.psfmask,
        guesses=guesses,
        cutoff=asked.pop("kl"),
        settings=FitSettings.configured(**{k: v for k, v in sampler.items() if v is not None}),
        execution=execution,
        **asked,
        **given(args, "companions", "injection"),
        **given(args, "companions", "step"),
    )
    for path in paths:
        print(path)


def clean(args: argparse.Namespace) -> None:
    """Remove what a stopped run kept in its output folder for a rerun to take up."""
    print(resume.clean(args.outdir))


def cluster(args: argparse.Namespace) -> None:
    with jobqueue_cluster(args.kind) as jobqueue:
        print(jobqueue.job_script())


def _quicklook(outdir: Path, folder: Path | None = None) -> list[Path]:
    """The quicklook PNGs of a run's products (matplotlib: imported only to draw them)."""
    from coron_dask.quicklook.plots import quicklook

    return quicklook(outdir, folder)


def plot(args: argparse.Namespace) -> None:
    for path in _quicklook(args.outdir, args.folder):
        print(path)


def _simulate(args: argparse.Namespace, outdir: Path) -> Path:
    return simulated(
        outdir,
        size=args.size,
        sci_exps=args.sci_exps,
        sci_ints=args.sci_ints,
        psf_exps=args.psf_exps,
        psf_ints=args.psf_ints,
        seed=args.seed,
        instrument=args.instrument,
        occulter=args.occulter,
    )


def simulate(args: argparse.Namespace) -> None:
    print(_simulate(args, args.outdir))


def companion_report(products: list[Path], truth_file: Path) -> str:
    """The simulated companion's signal-to-noise per roll and on the sky (i2d): one line,
    or one per KL cutoff of a KL-mode cube."""
    # astropy.table and astropy.wcs (0.5 s), which a plain run does without
    from coron_dask.science.photometry import companion_figures, kl_planes

    truth = json.loads(truth_file.read_text())
    lines = []
    for plane, cutoff in enumerate(kl_planes(products)):
        figures = companion_figures(products, truth, plane)
        rolls = ", ".join(f"{snr:.1f}" for snr in figures["rolls"])
        which = "" if cutoff is None else f" (KL {cutoff})"
        text = f"companion{which}: S/N {rolls} in the mean psfsub of each roll"
        if "i2d_snr" in figures:
            text += (
                f"; {figures['i2d_snr']:.1f} in the i2d, found {figures['i2d_offset']:.2f} px "
                "from its sky position"
            )
        lines.append(text)
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> None:
    """Simulate an observation, run it, report the companion and draw the quicklook."""
    inputs = args.outdir / "inputs"
    check_execution(cli=True, **given(args, "demo", "execution"))
    check_output_dir(args.outdir)
    asn = _simulate(args, inputs)
    if args.psfmask is None:
        args.psfmask = inputs / "psfmask.fits"
    products = _run(args, asn, args.outdir / "products")
    try:  # the products are placed: an error now leaves them on disk, and says so
        print("products:")
        for path in products:
            print(f"  {path}")
        print(companion_report(products, inputs / "truth.json"))
        pngs = _quicklook(args.outdir / "products")
        print(f"quicklook: {len(pngs)} PNG(s) in {args.outdir / 'products'}:")
        for path in pngs:
            print(f"  {path.name}")
    except BaseException as error:
        record_on_disk(error, products)
        raise


COMMANDS = {
    "run": run,
    "contrast": contrast,
    "companions": companions,
    "clean": clean,
    "cluster": cluster,
    "plot": plot,
    "simulate": simulate,
    "demo": demo,
}
