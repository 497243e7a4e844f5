"""The ``coron-dask`` command: run, simulate, demo."""

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from coron_dask.errors import ClusterError, CoronInputError

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is logged (tests replace it)."""

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _log_to_stderr() -> Callable[[], None]:
    """Show coron-dask's INFO messages (workers joined, block plan) on stderr, as jwst's
    steps log theirs; dask's loggers are left alone. Returns the function that undoes it,
    so that ``main`` called from Python leaves logging as it found it."""
    logger = logging.getLogger("coron_dask")
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
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
    step.add_argument("--truncate", type=_non_negative, help="KL modes kept by klip (50)")
    step.add_argument(
        "--median-box-length", type=_non_negative, help="box of the bad-pixel median fill (3)"
    )
    step.add_argument(
        "--bad-bits", help="DQ flags of bad pixels, names or integer (DO_NOT_USE; '' for none)"
    )
    step.add_argument("--psfmask", type=Path, help="PSFMASK FITS file (weights, 0 = ignore)")
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
        help="do not write psfalign: KLIP consumes the aligned references as they are made, "
        "so disk no longer bounds integrations × references",
    )
    run.add_argument(
        "--report", type=Path, help="save dask's performance report (HTML; distributed clusters)"
    )
    run.add_argument("--stats", type=Path, help="save where the time went (JSON)")


def _run(args: argparse.Namespace, asn: Path, output_dir: Path) -> list[Path]:
    from coron_dask.cluster import Cluster

    # a LocalCluster starts in the background while the pipeline's modules import
    with Cluster(
        args.scheduler,
        args.scheduler_file,
        n_workers=args.n_workers,
        memory_limit=args.memory_limit,
        kind=args.cluster,
        jobs=args.jobs,
        adapt=args.adapt,
        wait_for_workers=args.wait_for_workers,
    ) as cluster:
        from coron_dask.pipeline import run_coron3

        return run_coron3(
            asn,
            output_dir,
            align_to=args.align_to,
            truncate=args.truncate,
            median_box_length=args.median_box_length,
            bad_bits=args.bad_bits,
            psfmask=args.psfmask,
            integrations=args.integrations_per_chunk,
            psfs=args.psfs_per_chunk,
            skip=args.skip,
            orientation=args.orientation,
            progress=not args.no_progress,
            report=args.report,
            stats=args.stats,
            cluster=cluster,
            format=args.format,
            save_psfalign=args.save_psfalign,
        )


def _simulate(args: argparse.Namespace, outdir: Path) -> Path:
    from coron_dask.simulate import simulate

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
    from coron_dask.photometry import companion_figures

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
    parser = _Parser(
        prog="coron-dask",
        description="JWST coronagraphic stage 3 (calwebb_coron3) on Dask, out-of-core.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run stage 3 on an association")
    run.add_argument("asn", type=Path, help="level-3 association JSON")
    run.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="default: .")
    _add_run_options(run)
    jobscript = commands.add_parser(
        "cluster", help="print the batch job script dask-jobqueue would submit for workers"
    )
    jobscript.add_argument("kind", choices=["slurm", "pbs"])
    sim = commands.add_parser("simulate", help="write a simulated coronagraphic observation")
    sim.add_argument("outdir", type=Path)
    demo = commands.add_parser("demo", help="simulate, run, and report the companion")
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
    restore_logging = _log_to_stderr()
    try:
        if args.command == "run":
            for path in _run(args, args.asn, args.output_dir):
                print(path)
        elif args.command == "cluster":
            from coron_dask.cluster import jobqueue_cluster

            with jobqueue_cluster(args.kind) as cluster:
                print(cluster.job_script())
        elif args.command == "simulate":
            print(_simulate(args, args.outdir))
        else:
            inputs = args.outdir / "inputs"
            asn = _simulate(args, inputs)
            if args.psfmask is None:
                args.psfmask = inputs / "psfmask.fits"
            products = _run(args, asn, args.outdir / "products")
            print("products:")
            for path in products:
                print(f"  {path}")
            print(companion_report(products, inputs / "truth.json"))
    except CoronInputError as error:
        print(f"coron-dask: error: {error}", file=sys.stderr)
        return 2
    except ClusterError as error:
        print(f"coron-dask: error: cluster: {error}; no product was written", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. the disk filled up while the products were written
        where = error.filename or "output"
        print(
            f"coron-dask: error: {where}: {error.strerror or error}; no product was written",
            file=sys.stderr,
        )
        return 1
    except ValueError as error:
        if args.command != "simulate":
            raise
        print(f"coron-dask: error: {error}", file=sys.stderr)
        return 2
    finally:
        restore_logging()
    return 0


if __name__ == "__main__":
    sys.exit(main())
