"""A run of calwebb_coron3: its input and options checked before anything starts, a cluster
connected to (or started), the products built for its workers and written in one
computation, the detection map and candidates of the i2d among them."""

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from dask.local import get_sync
from dask.utils import parse_bytes

from coron_dask.core.config import read_execution, resolve_parameters
from coron_dask.core.errors import CoronInputError, record_on_disk
from coron_dask.core.parameters import PSFMASK_CHOICES, said
from coron_dask.io import Product, read_psfmask, write_products
from coron_dask.pipeline import build  # build.build_products looked up at each run
from coron_dask.pipeline.observation import Observation, find_psfmask, open_association
from coron_dask.runtime.deploy import (
    LOCAL_SCHEDULERS,
    Cluster,
    in_process,
    local_worker_count,
    measure_workers,
    on_cluster,
)
from coron_dask.runtime.execute import execute
from coron_dask.runtime.jobqueue import check_jobqueue
from coron_dask.runtime.resources import allocation
from coron_dask.steps.reference_choice import check_maxnumbasis
from coron_dask.steps.references import fewest_references

log = logging.getLogger(__name__)
#: Options that say where a run goes, which a cluster or client under way already says.
UNDER_WAY = (
    "scheduler",
    "scheduler_file",
    "n_workers",
    "memory_limit",
    "jobs",
    "adapt",
    "wait_for_workers",
)


def check_output_dir(output_dir: str | Path) -> None:
    """Raise CoronInputError unless products can be written in ``output_dir``: a folder, or
    one that can be made, that this process may write in."""
    path = Path(output_dir).absolute()
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise CoronInputError(existing, "is a file: products go in a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CoronInputError(existing, "is not writable")


def check_inputs(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    **parameters: object,
) -> tuple[dict, Observation]:
    """Check a run's input before any cluster starts: parameters, every member's header and
    frame size, KLIP's zones in each science exposure, the PSFMASK, the output folder.
    Returns the parameters resolved and the observation opened (whole exposures)."""
    resolved = resolve_parameters(**parameters)
    observation = open_association(asn)
    # the fewest references a science exposure has in its mode (ADI: the other rolls' too)
    npsf = fewest_references(
        observation.science, observation.psfstack.sizes["psf"], resolved["mode"]
    )
    check_maxnumbasis(resolved["maxnumbasis"], resolved["truncate"], npsf)
    for exposure in observation.science:
        build.exposure_zones(exposure, resolved, logged=False)
    if psfmask is not None and str(psfmask).lower() not in PSFMASK_CHOICES:
        frame = observation.psfstack
        read_psfmask(psfmask, (frame.sizes["y"], frame.sizes["x"]))
    check_output_dir(output_dir)
    return resolved, observation


def check_execution(
    *, cli: bool = False, cluster: object = None, client: object = None, **given: object
) -> dict:
    """Refuse, before anything starts, execution options (``run_coron3``'s) that cannot be
    read or cannot apply where the run goes (a LocalCluster, a running scheduler, batch jobs,
    dask's local schedulers, a ``cluster`` or ``client`` under way): an option is honoured
    or refused, never ignored. One CoronInputError names the option, as Python does, or as
    the command line does with ``cli``. Returns the options given, read (None: not given)."""
    options = read_execution(**given)
    scheduler, scheduler_file = options.get("scheduler"), options.get("scheduler_file")
    kind = options.get("kind") or "local"
    running, local = scheduler or scheduler_file, scheduler in LOCAL_SCHEDULERS

    def name(option: str, value: object = None) -> str:
        return said(option, value, cli=cli)

    def refuse(option: str, problem: str) -> None:
        raise CoronInputError(option, problem)

    where = (
        name("scheduler", scheduler)
        if scheduler
        else name("scheduler_file")
        if scheduler_file
        else name("kind", kind)
    )
    if cluster is not None or client is not None:
        under_way = "cluster" if client is None else "client"
        for option in UNDER_WAY:
            if options.get(option) is not None:
                refuse(name(option), f"cannot go with a {under_way} under way: it is used as it is")
        if kind != "local":
            refuse(name("kind", kind), f"cannot go with a {under_way} under way")
    if scheduler and scheduler_file:
        refuse(
            name("scheduler_file"),
            f"give either {name('scheduler')} or {name('scheduler_file')}, not both",
        )
    if running and kind != "local":
        refuse(name("kind", kind), f"starts its own scheduler: it cannot go with {where}")
    for option in ("n_workers", "memory_limit"):
        if options.get(option) is not None and (running or kind != "local"):
            refuse(
                name(option),
                f"sizes the LocalCluster coron-dask starts; with {where} the "
                "workers are sized where they are started",
            )
    for option in ("jobs", "adapt"):
        if options.get(option) is not None and (running or kind == "local"):
            refuse(name(option), f"sizes batch jobs of {name('kind', 'slurm')} or pbs, not {where}")
    wait = options.get("wait_for_workers")
    if wait is not None and not running and kind == "local":
        refuse(name("wait_for_workers"), "a LocalCluster has its workers when it starts")
    if local and wait is not None:
        refuse(name("wait_for_workers"), f"{where} has no workers to wait for")
    if local and options.get("report") is not None:
        refuse(
            name("report"), f"dask's performance report needs a distributed cluster, not {where}"
        )
    if scheduler_file and not Path(scheduler_file).parent.is_dir():
        refuse(scheduler_file, "its folder does not exist: no scheduler can write there")
    if kind != "local" and not running and cluster is None and client is None:
        check_jobqueue(kind)
    memory_limit = options.get("memory_limit")
    if memory_limit is not None and memory_limit != "auto":
        try:
            limit = parse_bytes(memory_limit)
        except (ValueError, TypeError):
            refuse(name("memory_limit"), f"cannot read {memory_limit!r} as a size: e.g. 4GiB")
        if limit <= 0:
            refuse(name("memory_limit"), f"must be more than 0, got {memory_limit!r}")
        count, available = local_worker_count(options.get("n_workers")), allocation()
        if count * limit > available.memory:
            refuse(
                name("memory_limit"),
                f"{count} worker(s) × {memory_limit} is more than the "
                f"{available.memory / 2**30:.1f} GiB this run may use "
                f"({available.memory_from}): the system would kill workers before dask could "
                "pause them (fewer workers, or a smaller limit)",
            )
    for option in ("report", "stats"):
        path = options.get(option)
        if path is not None and path.is_dir():
            refuse(path, f"{name(option)} names a file to write, and this is a folder")
        if path is not None and not os.access(path.absolute().parent, os.W_OK | os.X_OK):
            refuse(path, f"{name(option)}: its folder does not exist or is not writable")
    return options


def execute_on_cluster(
    build,
    *,
    cluster: Cluster | None = None,
    client: object | None = None,
    data_bytes: int | None = None,
    output_dir: str | Path | None = None,
    inputs: list[Path] | None = None,
    after: Callable | None = None,
    **where: object,
) -> list[Path]:
    """Connect to (or start) the cluster ``where`` describes (``run_coron3``'s execution
    options, checked by ``check_execution``: scheduler, scheduler_file, n_workers,
    memory_limit, kind, jobs, adapt, wait_for_workers, quiet, progress, report, stats; or a
    ``cluster`` under way, or a distributed ``client`` you have, which is used and left
    open), build the products with ``build(workers)`` for its workers and write them in one
    computation: their paths. A run of ``data_bytes`` (``observation_bytes``) that asks for
    no cluster may compute in this process (``cluster.in_process``). Distributed workers
    must see ``output_dir`` and the ``inputs`` (the files the products are made from) at
    the same paths as this process (``connection.shared_folder``), or the run is refused
    before anything is written; with ``inputs`` a run stopped part way can be taken up by
    the same run again (``staging.staged_products``). ``after(write, paths, workers, client)``, once
    the products are placed, does more on the same cluster: ``write(products)`` writes
    more products in one computation of the same client (not in ``report`` and ``stats``:
    those are the products' computation's); its paths are added to the run's (an error
    there leaves the run's products on disk, and says so)."""
    where = check_execution(cluster=cluster, client=client, **where)
    progress = where.pop("progress", None) is not False
    report, stats = where.pop("report", None), where.pop("stats", None)
    where = {name: value for name, value in where.items() if value is not None}
    with contextlib.ExitStack() as resources:
        if client is None:
            if cluster is None:
                if in_process(data_bytes, report=report, **where):
                    where = {**where, "scheduler": "threads"}
                cluster = resources.enter_context(Cluster(**where))
            client = cluster.client
        if report and client is None:
            raise CoronInputError(
                "report", "needs a distributed cluster, not dask's local schedulers"
            )
        workers = measure_workers(client)
        log.info("workers: %s", workers.describe())
        late_workers = None  # dask's local schedulers compute in this process: no check
        if client is not None and output_dir is not None:
            shared = on_cluster().shared_folder(client, output_dir, inputs or ())
            late_workers = resources.enter_context(shared)
        products = build(workers)

        def compute(*writes: object, first: bool = True) -> None:
            try:  # the report and stats are the products' computation's
                kept = {"report": report, "stats": stats} if first else {}
                execute(writes, client, progress=progress, **kept)
            finally:  # a worker that joined and sees another folder: the run's failure
                if late_workers is not None:
                    late_workers()

        paths = write_products(products, compute, inputs)
        if after is None:
            return paths

        def more(products: list[Product]) -> list[Path]:
            return write_products(products, lambda *writes: compute(*writes, first=False))

        try:
            return [*paths, *after(more, paths, workers, client)]
        except BaseException as error:  # those still there (not a scratch file removed)
            record_on_disk(error, [path for path in paths if Path(path).exists()])
            raise


def observation_bytes(observation: Observation, align_to: str) -> int:
    """What a run of ``observation`` reads and aligns: its exposures' SCI, ERR and DQ, and
    the aligned references' SCI and ERR (psfalign, kept or as a scratch file), in bytes."""
    inputs = sum(
        dataset[name].nbytes
        for dataset in (*observation.science, *observation.psf)
        for name in ("sci", "err", "dq")
        if name in dataset
    )
    targets = sum(
        dataset.sizes["integration"] if align_to == "each" else 1 for dataset in observation.science
    )
    frame = observation.psfstack.sizes["y"] * observation.psfstack.sizes["x"]
    return int(inputs + 2 * 4 * targets * observation.psfstack.sizes["psf"] * frame)


def log_flagged_fits(paths: list[Path]) -> None:
    """Log, from each psfsub's ALIGN record, the reference fits that did not converge: the
    pairs align_refs flagged (aligned frame NaN) and klip left out. A fit's success is
    known only once it ran: the record written is where the run says it."""
    from coron_dask.io.backend import open_product  # astropy.wcs: only once products exist

    for path in paths:
        if not Path(path).name.endswith(("_psfsub.fits", "_psfsub.zarr")):
            continue
        converged = open_product(path).get("converged")
        if converged is None:  # no ALIGN
            continue
        converged = converged.compute(scheduler=get_sync).values  # a small table, read here
        if not converged.all():
            log.warning(
                "align_refs: %d of %d reference fits to %s did not converge: flagged "
                "(aligned frames NaN, left out by klip; ALIGN's CONVERGED says which)",
                int((~converged).sum()),
                converged.size,
                Path(path).name,
            )


def run_inputs(observation: Observation, psfmask: str | Path | None) -> list[Path]:
    """The files a run's products are made from: the association, its members and the
    PSFMASK (what a run taken up must find unchanged)."""
    association = observation.association
    files = [association.path, *association.science, *association.psf]
    return files + ([Path(psfmask)] if psfmask and Path(psfmask).is_file() else [])


def run_coron3(
    asn: str | Path,
    output_dir: str | Path = ".",
    *,
    psfmask: str | Path | None = None,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    memory_limit: str | float | None = None,
    kind: str = "local",
    jobs: int | None = None,
    adapt: tuple[int, int] | None = None,
    wait_for_workers: int | None = None,
    progress: bool = True,
    quiet: bool = False,
    report: str | Path | None = None,
    stats: str | Path | None = None,
    cluster: Cluster | None = None,
    client: object | None = None,
    companions: object | None = None,
    **parameters: object,
) -> list[Path]:
    """Run calwebb_coron3 on an association and return the paths of the products written.

    ``parameters`` are those of ``build_products`` (skip, snr, maskpt, good_bits, align_to,
    median_box_length, bad_bits, truncate, annuli, subsections, annuli_spacing, iwa, owa,
    mode, movement, orientation, format, save_psfalign, integrations, psfs, outlier_rows),
    the configured defaults where not given. ``scheduler``: None starts
    a LocalCluster of ``n_workers`` processes for the run (or, with ``kind`` "slurm" or
    "pbs", ``jobs`` batch jobs of workers, or between the ``adapt`` minimum and maximum); an
    address or ``scheduler_file`` uses a running cluster, once ``wait_for_workers`` workers
    joined; ``"synchronous"`` or ``"threads"`` use dask's local schedulers; a ``cluster``
    already under way (``cluster.Cluster``) is used as it is, and so is a distributed
    ``client`` you already have (a notebook's), which the run leaves open. Options that
    cannot apply where the run goes are refused (``check_execution``), and the input is
    checked, before the cluster computes anything, so bad input fails fast and leaves no
    product. ``report`` saves dask's performance report (HTML), ``stats`` a JSON summary of
    where the time went. With an i2d, its detection map and candidates are made in the
    same computation (``with_detection``), and every product is placed at once, whole or
    not at all. ``companions`` (``pipeline.companion_session.SessionCompanions``) fits the
    candidates of that detection on the same cluster once the products are placed, and
    writes what it measured after them (checked with the input, before anything starts).
    """
    execution = check_execution(
        scheduler=scheduler,
        scheduler_file=scheduler_file,
        n_workers=n_workers,
        memory_limit=memory_limit,
        kind=kind,
        jobs=jobs,
        adapt=adapt,
        wait_for_workers=wait_for_workers,
        progress=progress,
        quiet=quiet,
        report=report,
        stats=stats,
        cluster=cluster,
        client=client,
    )
    psfmask = find_psfmask(asn, psfmask)  # before any cluster starts, as the input checks
    parameters, observation = check_inputs(asn, output_dir, psfmask=psfmask, **parameters)
    after = None
    if companions is not None:  # its own input checked now: a bad one starts nothing
        after = companions.prepared(asn, output_dir, parameters, observation, psfmask)
    paths = execute_on_cluster(
        lambda workers: with_detection(
            build.build_products(
                asn, output_dir, psfmask=psfmask, workers=workers, opened=observation, **parameters
            )
        ),
        cluster=cluster,
        client=client,
        data_bytes=observation_bytes(observation, parameters["align_to"]),
        output_dir=output_dir,
        inputs=run_inputs(observation, psfmask),
        after=after,
        **execution,
    )
    log_flagged_fits(paths)
    return paths


def with_detection(products: list[Product]) -> list[Product]:
    """``products``, and the detection map and candidates of their i2d, built on its lazy
    image (``detection.detection_products``): computed with the others, placed with them."""
    if not any(item.kind == "i2d" for item in products):
        return products
    from coron_dask.science.detection import detection_products  # astropy.table: only with an i2d

    return [*products, *detection_products(products)]
