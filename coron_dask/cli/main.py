"""The ``coron-dask`` command: its parser, and how each way a command ends becomes one line
and an exit code. What each command does is ``cli.commands``'; the options of a run are made
from the parameter spec (``cli.options``)."""

import argparse
import logging
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from coron_dask import __version__
from coron_dask.cli.options import add_options
from coron_dask.core.errors import ClusterError, CoronInputError, Interrupted, on_disk
from coron_dask.core.parameters import BY_NAME
from coron_dask.runtime.deploy import quiet_distributed
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    """coron-dask's parser: a command, its arguments and options."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="log DEBUG messages; show a traceback on errors"
    )
    parser = _Parser(
        prog="coron-dask",
        description="JWST coronagraphic stage 3 (calwebb_coron3) on Dask, out-of-core.",
        epilog="exit codes: 0 done; 1 unexpected error; 2 bad input or options (nothing "
        "started); 3 the cluster could not finish; 4 products could not be written; "
        "130 SIGINT, 143 SIGTERM (what was written is kept: the same command again takes the "
        "run up, `coron-dask clean DIR` removes it). No product is left partly written: a "
        "run places all its products or none, and its error line says which are on disk.",
    )
    parser.add_argument("--version", action="version", version=f"coron-dask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run stage 3 on an association", parents=[common])
    run.add_argument("asn", type=Path, help="level-3 association JSON")
    run.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="default: .")
    add_options(run, "run")
    contrast = commands.add_parser(
        "contrast",
        help="5σ contrast curve of an association, calibrated by injecting companions",
        parents=[common],
    )
    contrast.add_argument("asn", type=Path, help="level-3 association JSON")
    contrast.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="default: .")
    add_options(contrast, "contrast")
    companions = commands.add_parser(
        "companions",
        help="fit companions' separation, PA and contrast with posteriors (exact RDI forward "
        "model)",
        parents=[common],
    )
    companions.add_argument("asn", type=Path, help="level-3 association JSON")
    companions.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="default: .")
    add_options(companions, "companions")
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
    clean = commands.add_parser(
        "clean",
        help="remove what a stopped run kept in an output folder for the same run again to "
        "take up (its partial products and records)",
        parents=[common],
    )
    clean.add_argument("outdir", type=Path, help="the output folder of the stopped run")
    sim = commands.add_parser(
        "simulate", help="write a simulated coronagraphic observation", parents=[common]
    )
    sim.add_argument("outdir", type=Path)
    demo = commands.add_parser(
        "demo", help="simulate, run, and report the companion", parents=[common]
    )
    demo.add_argument("outdir", type=Path, nargs="?", default=Path("demo_output"))
    add_options(demo, "demo")
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
        group.add_argument(
            "--occulter",
            type=float,
            metavar="IWA",
            help="NIRCam: a round occulter transmitting half the light at IWA λ/D (MASK335R: "
            "~6.3) dims the companion where it falls, and is written as the PSFMASK (its "
            "transmission map); default: the companion keeps its light",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    restore_logging = _log_to_stderr(args.debug)
    try:
        with signals_end_the_run():
            _command(args)
    except (Exception, Interrupted, KeyboardInterrupt) as error:
        code, line = _ending(error, args.command in ("run", "demo", "contrast", "companions"))
        if args.debug:
            traceback.print_exc()
        print(f"coron-dask: error: {line}", file=sys.stderr, flush=True)
        if not args.debug:  # the line above ends the log, whatever closes after it
            quiet_distributed()
        return code
    finally:
        restore_logging()
    return 0


def _command(args: argparse.Namespace) -> None:
    # the commands import the pipeline (numpy, dask.array, xarray, astropy: seconds), which
    # --help, --version and a usage error do without
    from coron_dask.cli.commands import COMMANDS

    COMMANDS[args.command](args)


def _on_disk(paths: list) -> str:
    """What a command that writes products leaves on disk, as its error line ends."""
    if not paths:
        return "; no product was written"
    folders = ", ".join(dict.fromkeys(str(Path(p).parent) for p in paths))
    if len(paths) == 1:
        return f"; {Path(paths[0]).name} was written, in {folders}"
    return f"; its {len(paths)} products were written, in {folders}"


def _named(error: CoronInputError) -> str:
    """The error's line, a parameter named by its option (``owa``: ``--owa``)."""
    parameter = BY_NAME.get(error.source)
    if parameter is None or parameter.option is None:
        return str(error)
    return f"{parameter.flag}: {error.problem}"


def _ending(error: BaseException, products: bool) -> tuple[int, str]:
    """The exit code and the one line of an error that ended a command; a command that
    writes products (``products``) says what it left on disk (``errors.on_disk``)."""
    placed = on_disk(error)
    after = _on_disk(placed) if products or placed else ""
    if getattr(error, "kept", None):  # a run stopped that can be taken up
        after = f"{after}, {error.kept}"
    if isinstance(error, KeyboardInterrupt):  # SIGINT outside the run's handlers
        error = Interrupted(signal.SIGINT)
    if isinstance(error, Interrupted):
        return 128 + error.signum, f"{error}{after}"
    if isinstance(error, CoronInputError):  # found before anything started, unless said
        return EXIT_INPUT, f"{_named(error)}{after if placed else ''}"
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
