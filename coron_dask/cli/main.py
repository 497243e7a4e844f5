"""The ``coron-dask`` command: run, contrast, plot, cluster, simulate, demo."""

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from coron_dask import __version__
from coron_dask.core.errors import ClusterError, CoronInputError, Interrupted
from coron_dask.runtime.signals import signals_end_the_run

#: Exit codes: each way a run can end has its own (a signal's is 128 + its number, as the
#: shell reports a process it ended).
EXIT_ERROR = 1  # an unexpected error: a bug, or a failure of a library
EXIT_INPUT = 2  # bad input or options: nothing was started
EXIT_CLUSTER = 3  # the cluster could not finish the run
EXIT_OUTPUT = 4  # the products could not be written (disk full, permissions)

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is logged (tests replace it)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _log_to_stderr(debug: bool = False) -> Callable[[], None]:
    """Show coron-dask's log (workers joined, block plan, what was skipped) on stderr, as
    jwst's steps log theirs: with times and step names in a batch log, as short lines on a
    terminal; DEBUG too with ``--debug``. dask's loggers are left alone. Returns the function
    that undoes it, so that ``main`` called from Python leaves logging as it found it."""
    logger = logging.getLogger("coron_dask")
    handler = _StderrHandler()
    terminal = sys.stderr.isatty()
    handler.setFormatter(logging.Formatter("%(message)s" if terminal else LOG_FORMAT))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate

    return restore


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as bad input."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _cutoffs(text: str) -> int | tuple[int, ...]:
    """--truncate: one number of KL modes, or several separated by commas."""
    from coron_dask.pipeline.build import truncation

    try:
        return truncation(text)
    except CoronInputError as error:
        raise argparse.ArgumentTypeError(error.problem) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _adapt_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if not 1 <= low <= high:  # blocks are planned from the first worker's memory
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return low, high


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    step = parser.add_argument_group(
        "steps (jwst's parameters; defaults from the coron_dask section of dask's config)"
    )
    step.add_argument(
        "--align-to",
        choices=["each", "first"],
        help="align references to each science integration (4-D psfalign, "
        "default) or to the first one of each exposure (jwst >= 1.16)",
    )
    step.add_argument(
        "--truncate",
        type=_cutoffs,
        help="KL modes kept by klip (50); several, e.g. 5,10,20,50: a KL-mode cube, one "
        "psfsub and i2d image per cutoff from one basis",
    )
    step.add_argument(
        "--median-box-length", type=_non_negative, help="box of the bad-pixel median fill (3)"
    )
    step.add_argument(
        "--bad-bits", help="DQ flags of bad pixels, names or integer (DO_NOT_USE; '' for none)"
    )
    step.add_argument(
        "--psfmask",
        help="PSFMASK FITS file (weights, 0 = ignore); 'crds': the one CRDS gives for the "
        "science header, as jwst (default); 'none': every pixel weighs 1",
    )
    step.add_argument(
        "--skip",
        action="append",
        choices=["outlier_detection", "resample"],
        help="skip a step, as jwst's --steps.<step>.skip (repeatable)",
    )
    step.add_argument(
        "--orientation",
        choices=["detector", "north"],
        help="i2d grid: the first exposure's detector orientation, or north up",
    )
    run = parser.add_argument_group("execution")
    run.add_argument(
        "--integrations-per-chunk",
        type=_positive,
        help="science integrations per block (default: from the workers' memory)",
    )
    run.add_argument(
        "--psfs-per-chunk",
        type=_positive,
        help="references per alignment block (default: from the workers' memory)",
    )
    run.add_argument("--n-workers", type=_positive, help="LocalCluster worker processes")
    run.add_argument(
        "--memory-limit", help="memory limit per LocalCluster worker, e.g. '4GiB' (auto)"
    )
    run.add_argument(
        "--scheduler",
        help="address of a running dask scheduler, or "
        "'synchronous' / 'threads' for dask's local schedulers",
    )
    run.add_argument("--scheduler-file", help="scheduler file of a running dask cluster")
    run.add_argument(
        "--cluster",
        choices=["local", "slurm", "pbs"],
        default="local",
        help="start a LocalCluster (default) or submit workers through "
        "dask-jobqueue, configured in a jobqueue.yaml (see cluster/)",
    )
    jobs = run.add_mutually_exclusive_group()
    jobs.add_argument("--jobs", type=_positive, help="batch jobs of workers (slurm, pbs)")
    jobs.add_argument(
        "--adapt",
        type=_adapt_range,
        metavar="MIN:MAX",
        help="adapt between MIN and MAX batch jobs (slurm, pbs)",
    )
    run.add_argument(
        "--wait-for-workers",
        type=_positive,
        metavar="N",
        help="with --scheduler/--scheduler-file/--cluster slurm|pbs: plan blocks only once N "
        "workers have joined (default 1; slurm, pbs: the workers of the jobs asked for)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--format", choices=["fits", "zarr"], help="products as FITS files (default) or Zarr stores"
    )
    run.add_argument(
        "--no-psfalign",
        dest="save_psfalign",
        action="store_const",
        const=False,
        help="do not write psfalign: the aligned SCI goes to a scratch file KLIP reads, "
        "removed at the end (half the size of psfalign)",
    )
    run.add_argument(
        "--report", type=Path, help="save dask's performance report (HTML; distributed clusters)"
    )
    run.add_argument("--stats", type=Path, help="save where the time went (JSON)")


def _check_execution(args: argparse.Namespace) -> None:
    """Refuse, before anything starts, execution options that cannot be read or cannot
    apply where the run goes (a LocalCluster, a running scheduler, batch jobs, dask's local
    schedulers): an option is honoured or refused, never ignored."""
    from dask.utils import parse_bytes

    from coron_dask.runtime.deploy import LOCAL_SCHEDULERS, local_worker_count
    from coron_dask.runtime.jobqueue import check_jobqueue
    from coron_dask.runtime.resources import system_memory

    running = args.scheduler or args.scheduler_file
    local = args.scheduler in LOCAL_SCHEDULERS
    where = (
        f"--scheduler {args.scheduler}"
        if args.scheduler
        else "--scheduler-file"
        if args.scheduler_file
        else f"--cluster {args.cluster}"
    )

    def refuse(option: str, problem: str) -> None:
        raise CoronInputError(option, problem)

    if args.scheduler and args.scheduler_file:
        refuse("--scheduler-file", "give either --scheduler or --scheduler-file, not both")
    if running and args.cluster != "local":
        refuse(f"--cluster {args.cluster}", f"starts its own scheduler: it cannot go with {where}")
    for option, value in (("--n-workers", args.n_workers), ("--memory-limit", args.memory_limit)):
        if value is not None and (running or args.cluster != "local"):
            refuse(
                option,
                f"sizes the LocalCluster coron-dask starts; with {where} the "
                "workers are sized where they are started",
            )
    for option, value in (("--jobs", args.jobs), ("--adapt", args.adapt)):
        if value is not None and (running or args.cluster == "local"):
            refuse(option, f"sizes batch jobs of --cluster slurm or pbs, not {where}")
    if args.wait_for_workers is not None and not running and args.cluster == "local":
        refuse("--wait-for-workers", "a LocalCluster has its workers when it starts")
    if local and args.wait_for_workers is not None:
        refuse("--wait-for-workers", f"{where} has no workers to wait for")
    if local and args.report is not None:
        refuse("--report", f"dask's performance report needs a distributed cluster, not {where}")
    if args.scheduler_file and not Path(args.scheduler_file).parent.is_dir():
        refuse(args.scheduler_file, "its folder does not exist: no scheduler can write there")
    if args.cluster != "local" and not running:
        check_jobqueue(args.cluster)
    if args.memory_limit is not None and args.memory_limit != "auto":
        try:
            limit = parse_bytes(args.memory_limit)
        except ValueError:
            refuse("--memory-limit", f"cannot read {args.memory_limit!r} as a size: e.g. 4GiB")
        if limit <= 0:
            refuse("--memory-limit", f"must be more than 0, got {args.memory_limit!r}")
        count, available = local_worker_count(args.n_workers), system_memory()
        if count * limit > available:
            refuse(
                "--memory-limit",
                f"{count} worker(s) × {args.memory_limit} is more than this machine's "
                f"{available / 2**30:.1f} GiB: the system would kill workers before dask "
                "could pause them (fewer workers, or a smaller limit)",
            )
    for option, path in (("--report", args.report), ("--stats", args.stats)):
        if path is not None and path.is_dir():
            refuse(path, f"{option} names a file to write, and this is a folder")
        if path is not None and not os.access(path.absolute().parent, os.W_OK | os.X_OK):
            refuse(path, f"{option}: its folder does not exist or is not writable")


def _parameters(args: argparse.Namespace) -> dict:
    """The step and block parameters given on the command line (None: configured)."""
    return dict(
        align_to=args.align_to,
        truncate=args.truncate,
        median_box_length=args.median_box_length,
        bad_bits=args.bad_bits,
        integrations=args.integrations_per_chunk,
        psfs=args.psfs_per_chunk,
        skip=args.skip,
        orientation=args.orientation,
        format=args.format,
        save_psfalign=args.save_psfalign,
    )


def _execution(args: argparse.Namespace) -> dict:
    """Where and how the run computes (``pipeline.execute_on_cluster``'s options)."""
    return dict(
        scheduler=args.scheduler,
        scheduler_file=args.scheduler_file,
        n_workers=args.n_workers,
        memory_limit=args.memory_limit,
        kind=args.cluster,
        jobs=args.jobs,
        adapt=args.adapt,
        wait_for_workers=args.wait_for_workers,
        progress=not args.no_progress,
        report=args.report,
        stats=args.stats,
    )


def _run(args: argparse.Namespace, asn: Path, output_dir: Path) -> list[Path]:
    """run_coron3 with the command line's options (``_check_execution`` has checked them)."""
    from coron_dask.pipeline.build import run_coron3

    return run_coron3(
        asn, output_dir, psfmask=args.psfmask, **_execution(args), **_parameters(args)
    )


def _contrast(args: argparse.Namespace) -> list[Path]:
    """contrast_curve with the command line's options."""
    from coron_dask.science.contrast import contrast_curve

    parameters = _parameters(args)
    del parameters["save_psfalign"]  # a contrast run writes no psfalign
    return contrast_curve(
        args.asn,
        args.output_dir,
        offaxis_psf=args.offaxis_psf,
        star_flux=args.star_flux,
        separations=args.separations,
        position_angles=tuple(args.position_angles),
        inject_contrast=args.inject_contrast,
        resolution=args.resolution,
        psfmask=args.psfmask,
        execution=_execution(args),
        **parameters,
    )


def _numbers(text: str) -> list[float]:
    """Numbers separated by commas."""
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be numbers separated by commas, got {text!r}"
        ) from None


def _simulate(args: argparse.Namespace, outdir: Path) -> Path:
    from coron_dask.science.simulate import simulate

    return simulate(
        outdir,
        size=args.size,
        sci_exps=args.sci_exps,
        sci_ints=args.sci_ints,
        psf_exps=args.psf_exps,
        psf_ints=args.psf_ints,
        seed=args.seed,
        instrument=args.instrument,
    )


def companion_report(products: list[Path], truth_file: Path) -> str:
    """The simulated companion's signal-to-noise per roll and on the sky (i2d)."""
    from coron_dask.science.photometry import companion_figures

    figures = companion_figures(products, json.loads(truth_file.read_text()))
    rolls = ", ".join(f"{snr:.1f}" for snr in figures["rolls"])
    text = f"companion: S/N {rolls} in the mean psfsub of each roll"
    if "i2d_snr" in figures:
        text += (
            f"; {figures['i2d_snr']:.1f} in the i2d, found {figures['i2d_offset']:.2f} px from "
            "its sky position"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="log DEBUG messages; show a traceback on errors"
    )
    parser = _Parser(
        prog="coron-dask",
        description="JWST coronagraphic stage 3 (calwebb_coron3) on Dask, out-of-core.",
        epilog="exit codes: 0 done; 1 unexpected error; 2 bad input or options (nothing "
        "started); 3 the cluster could not finish; 4 products could not be written; "
        "130 SIGINT, 143 SIGTERM. No product is left partly written.",
    )
    parser.add_argument("--version", action="version", version=f"coron-dask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run stage 3 on an association", parents=[common])
    run.add_argument("asn", type=Path, help="level-3 association JSON")
    run.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="default: .")
    _add_run_options(run)
    contrast = commands.add_parser(
        "contrast",
        help="5σ contrast curve of an association, calibrated by injecting companions",
        parents=[common],
    )
    contrast.add_argument("asn", type=Path, help="level-3 association JSON")
    contrast.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="default: .")
    injection = contrast.add_argument_group("injection-recovery")
    injection.add_argument(
        "--offaxis-psf",
        type=Path,
        required=True,
        help="the star unocculted: a FITS image in the calints' units (SCI or primary)",
    )
    injection.add_argument(
        "--star-flux", type=float, help="rescale the off-axis PSF to this total flux"
    )
    injection.add_argument(
        "--separations",
        type=_numbers,
        help="companions' separations, arcsec, e.g. 0.5,1,1.5 (default: 10 from 3 λ/D to "
        "the field's edge)",
    )
    injection.add_argument(
        "--position-angles",
        type=_numbers,
        default=[0.0, 120.0, 240.0],
        help="one set of companions per angle, degrees east of north (0,120,240)",
    )
    injection.add_argument(
        "--inject-contrast",
        type=float,
        default=1e-4,
        help="contrast of the injected companions (1e-4; KLIP is linear: any will do)",
    )
    injection.add_argument(
        "--resolution",
        type=float,
        help="λ/D in pixels (default: from FILTER's pivot wavelength)",
    )
    _add_run_options(contrast)
    jobscript = commands.add_parser(
        "cluster",
        help="print the batch job script dask-jobqueue would submit for workers",
        parents=[common],
    )
    jobscript.add_argument("kind", choices=["slurm", "pbs"])
    plot = commands.add_parser(
        "plot",
        help="quicklook PNGs of a run's products: psfsub means, i2d, detection map, "
        "contrast curve, alignment shifts",
        parents=[common],
    )
    plot.add_argument("outdir", type=Path, help="the folder of a run's products")
    plot.add_argument(
        "-o",
        "--output-dir",
        dest="folder",
        metavar="FOLDER",
        type=Path,
        help="where the PNGs go (default: OUTDIR)",
    )
    sim = commands.add_parser(
        "simulate", help="write a simulated coronagraphic observation", parents=[common]
    )
    sim.add_argument("outdir", type=Path)
    demo = commands.add_parser(
        "demo", help="simulate, run, and report the companion", parents=[common]
    )
    demo.add_argument("outdir", type=Path, nargs="?", default=Path("demo_output"))
    _add_run_options(demo)
    for sub in (sim, demo):
        group = sub.add_argument_group("simulated observation")
        group.add_argument("--size", type=_positive, default=128, help="frame size (pixels)")
        group.add_argument("--sci-exps", type=_positive, default=2)
        group.add_argument("--sci-ints", type=_positive, default=8)
        group.add_argument("--psf-exps", type=_positive, default=9, help="SGD positions")
        group.add_argument("--psf-ints", type=_positive, default=5)
        group.add_argument("--seed", type=int, default=1)
        group.add_argument(
            "--instrument",
            choices=["nircam", "miri"],
            default="nircam",
            help="NIRCam round mask (--size) or MIRI 4QPM (224x288, MASK1140)",
        )
    args = parser.parse_args(argv)
    restore_logging = _log_to_stderr(args.debug)
    try:
        with signals_end_the_run():
            _command(args)
    except (Exception, Interrupted, KeyboardInterrupt) as error:
        code, line = _ending(error, args.command in ("run", "demo", "contrast"))
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"coron-dask: error: {line}", file=sys.stderr, flush=True)
        if not args.debug:  # the line above ends the log, whatever closes after it
            from coron_dask.runtime.deploy import quiet_distributed

            quiet_distributed()
        return code
    finally:
        restore_logging()
    return 0


def _command(args: argparse.Namespace) -> None:
    if args.command == "run":
        _check_execution(args)
        for path in _run(args, args.asn, args.output_dir):
            print(path)
    elif args.command == "contrast":
        _check_execution(args)
        for path in _contrast(args):
            print(path)
    elif args.command == "cluster":
        from coron_dask.runtime.jobqueue import jobqueue_cluster

        with jobqueue_cluster(args.kind) as cluster:
            print(cluster.job_script())
    elif args.command == "plot":
        from coron_dask.quicklook.plots import quicklook

        for path in quicklook(args.outdir, args.folder):
            print(path)
    elif args.command == "simulate":
        print(_simulate(args, args.outdir))
    else:
        inputs = args.outdir / "inputs"
        _check_execution(args)
        from coron_dask.pipeline.build import check_output_dir

        check_output_dir(args.outdir)
        asn = _simulate(args, inputs)
        if args.psfmask is None:
            args.psfmask = inputs / "psfmask.fits"
        products = _run(args, asn, args.outdir / "products")
        print("products:")
        for path in products:
            print(f"  {path}")
        print(companion_report(products, inputs / "truth.json"))
        from coron_dask.quicklook.plots import quicklook

        pngs = quicklook(args.outdir / "products")
        print(f"quicklook: {len(pngs)} PNG(s) in {args.outdir / 'products'}:")
        for path in pngs:
            print(f"  {path.name}")


def _ending(error: BaseException, products: bool) -> tuple[int, str]:
    """The exit code and the one line of an error that ended a command."""
    after = "; no product was written" if products else ""
    if isinstance(error, KeyboardInterrupt):  # SIGINT outside the run's handlers
        error = Interrupted(signal.SIGINT)
    if isinstance(error, Interrupted):
        return 128 + error.signum, f"{error}{after}"
    if isinstance(error, CoronInputError):
        return EXIT_INPUT, str(error)
    if isinstance(error, ClusterError):
        return EXIT_CLUSTER, f"cluster: {error}{after}"
    if isinstance(error, OSError):  # e.g. the disk filled up while the products were written
        where = error.filename or "output"
        return EXIT_OUTPUT, f"{where}: {error.strerror or error}{after}"
    if isinstance(error, ValueError) and not products:  # simulate's parameters
        return EXIT_INPUT, str(error)
    name = type(error).__name__
    return EXIT_ERROR, f"unexpected {name}: {error}{after} (--debug shows where)"


if __name__ == "__main__":
    sys.exit(main())
