"""coron-dask's parameters, each declared once, as jwst's steps declare theirs in ``spec``.

``SPEC`` lists every parameter of a run: jwst's step parameters and coron-dask's own (block
sizes, output format), the PSFMASK, where and how a run computes (execution), the contrast
curve's injections, and the settings that live only in dask's configuration. Each says its
name in Python, its key under ``coron_dask`` in dask's configuration and its default there,
how a value is read and checked (``core.readers``: one CoronInputError naming it), its
help, its command-line option and, for a step parameter, the primary-header keyword that
records it. From it are made: dask's defaults (``core.config``; ``coron_dask.yaml`` is
``config.yaml_text()``, written by ``python -m coron_dask.core.config >
coron_dask/core/coron_dask.yaml``), the checks of the Python API
(``core.config.resolve_parameters``), the options of ``coron-dask run``, ``contrast`` and
``demo`` (``cli.options``) and the provenance keywords (``pipeline.provenance``).
"""

from dataclasses import dataclass, field

from coron_dask.core.readers import (
    Number,
    OneOf,
    Reader,
    Steps,
    cutoffs,
    dq_bits,
    flag,
    job_range,
    numbers_list,
    path,
    text,
)

RUNS = ("run", "contrast", "companions", "demo")
MEASURES = ("contrast", "companions")  # the commands that take an off-axis PSF
FITS = ("companions", "run")  # the commands that fit companions (run: with --companions)


@dataclass(frozen=True)
class Parameter:
    """One parameter: see the module's docstring. ``role``: "step" (``build_products``'
    parameters), "input" (the PSFMASK), "execution" (``run_coron3``'s where and how),
    "injection" (``contrast_curve``'s and ``measure_companions``'), "companion" (the
    ``companions`` command's own) or "setting" (dask's configuration only). ``none``:
    what None means, where None is a value. ``option``: the command-line option ("" makes it
    from the name, None: there is none), given to ``commands``, in the help's ``group``;
    ``action``, ``metavar``, ``exclusive`` (options of one mutually exclusive set) and
    ``required`` as argparse takes them (or the commands that require it); ``option_help``
    for an option that says no.
    ``keyword``: the (keyword, comment) of the primary header that records it."""

    name: str
    help: str
    default: object = None
    key: str | None = None
    read: Reader | None = None
    none: str | None = None
    role: str = "step"
    option: str | None = ""
    commands: tuple[str, ...] = RUNS
    group: str = "steps (jwst's parameters; defaults from the coron_dask section of dask's config)"
    action: str | None = None
    metavar: str | None = None
    exclusive: str | None = None
    required: bool | tuple[str, ...] = False
    option_help: str | None = None
    keyword: tuple[str, str] | None = None
    choices: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        options = self.read.options if isinstance(self.read, OneOf | Steps) else ()
        object.__setattr__(self, "choices", options)

    @property
    def flag(self) -> str:
        """The command-line option: ``--name-with-dashes`` unless another is given."""
        return self.option or f"--{self.name.replace('_', '-')}"


EXECUTION_GROUP = "execution"
SKIPPABLE = ("outlier_detection", "resample")
PSFMASK_CHOICES = ("crds", "none")  # --psfmask's words; anything else names a file
FROM_MEMORY = "planned from the workers' memory"
#: where the companions command's own options go
COMPANION: dict = dict(role="companion", commands=("companions",), group="companions")
#: options of the companions command that ``run --companions`` takes too
FITTED: dict = dict(role="companion", commands=FITS, group="companions")

#: Parameter(name, help, default, key, read, none, role, ...): see ``Parameter``.
SPEC: tuple[Parameter, ...] = (
    # jwst's step parameters and coron-dask's, in the order provenance records them
    Parameter("skip", "skip a step, as jwst's --steps.<step>.skip (repeatable)", (), "skip",
              Steps(SKIPPABLE), action="append", keyword=("SKIP", "steps skipped")),
    Parameter("snr", "outlier_detection's snr (jwst's first value for coronagraphic data)",
              5.0, "outlier_detection.snr", Number(whole=False, above=0), option=None,
              keyword=("OUTL_SNR", "outlier_detection snr")),
    Parameter("maskpt", "outlier_detection's maskpt", 0.7, "outlier_detection.maskpt",
              Number(whole=False, low=0, high=1), option=None,
              keyword=("MASKPT", "outlier_detection maskpt")),
    Parameter("good_bits", "DQ bits that leave a pixel usable for outlier_detection's median",
              "~DO_NOT_USE", "outlier_detection.good-bits", dq_bits, option=None,
              keyword=("GOODBITS", "outlier_detection good_bits")),
    Parameter("align_to", "align references to each science integration (4-D psfalign) or to "
              "the first one of each exposure (jwst >= 1.16)", "each", "align_refs.align-to",
              OneOf(("each", "first")),
              keyword=("ALIGN_TO", "align_refs: to each or the first integration")),
    Parameter("median_box_length", "box of the bad-pixel median fill (jwst's default)", 3,
              "align_refs.median-box-length", Number(low=0),
              keyword=("MEDBOXLN", "align_refs median_box_length")),
    Parameter("bad_bits", "DQ flags of bad pixels, names or integer ('' for none)",
              "DO_NOT_USE", "align_refs.bad-bits", dq_bits,
              keyword=("BAD_BITS", "align_refs bad_bits")),
    Parameter("psfmask", "PSFMASK FITS file (weights, 0 = ignore); 'crds': the one CRDS gives "
              "for the science header, as jwst; 'none': every pixel weighs 1", "crds",
              "align_refs.psfmask", role="input"),
    Parameter("truncate", "KL modes kept by klip (jwst's default); several, e.g. 5,10,20,50: a "
              "KL-mode cube, one psfsub and i2d image per cutoff from one basis", 50,
              "klip.truncate", cutoffs, keyword=("TRUNCATE", "klip truncate: KL modes kept")),
    Parameter("annuli", "KLIP in N annuli about the star (pyKLIP's annuli), each with KL bases "
              "of its own: references fitted to the residuals at that separation, not the "
              "brighter ones inside (1: jwst's one basis over the frame)", 1, "klip.annuli",
              Number(low=1), keyword=("ANNULI", "klip: annuli about the star")),
    Parameter("subsections", "cut each annulus into M sectors of equal angle (pyKLIP's "
              "subsections), each with KL bases of its own", 1, "klip.subsections",
              Number(low=1), keyword=("SUBSECTS", "klip: subsections of each annulus")),
    Parameter("annuli_spacing", "widths of the annuli between the iwa and the owa, as pyKLIP "
              "spaces them: equal (constant), growing as 1 + ln(i+1) (log), or pyKLIP's "
              "linear", "constant", "klip.annuli-spacing", OneOf(("constant", "linear", "log")),
              keyword=("ANNSPACE", "klip: annuli spacing")),
    Parameter("iwa", "inner working angle, pixels from the star: KLIP leaves pixels closer "
              "out (NaN in psfsub)", 0.0, "klip.iwa", Number(whole=False, low=0),
              keyword=("IWA", "klip: inner working angle (pixels)")),
    Parameter("owa", "outer working angle, pixels from the star: KLIP leaves pixels farther "
              "out (NaN in psfsub)", None, "klip.owa", Number(whole=False, above=0),
              "annuli spaced to the farthest pixel, the last reaching the frame's edge, "
              "as pyKLIP's", keyword=("OWA", "klip: outer working angle (pixels)")),
    Parameter("mode", "KLIP's references (pyKLIP's modes): the reference star's frames (RDI, "
              "jwst's), the other rolls' science integrations aligned to each integration "
              "(ADI), or both (ADI+RDI)", "RDI", "klip.mode", OneOf(("RDI", "ADI", "ADI+RDI")),
              keyword=("KLIPMODE", "klip: references RDI, ADI or ADI+RDI")),
    Parameter("movement", "ADI: in each zone, leave out another roll's integration where the "
              "roll moves a companion at the zone's radius by less than this many pixels "
              "(pyKLIP's movement and default), so a companion does not subtract itself", 3.0,
              "klip.movement", Number(whole=False, low=0),
              keyword=("MOVEMENT", "klip: least ADI movement (pixels)")),
    Parameter("maxnumbasis", "KLIP with, for each science integration and zone, only the N "
              "references most correlated with it there (pyKLIP's maxnumbasis; ADI: of those "
              "movement keeps): a library of many stars, fitted with the references that look "
              "like the integration; the choice is written in psfsub (REFS, REFCORR)", None,
              "klip.maxnumbasis",
              Number(low=1), "every reference, as jwst",
              keyword=("MAXNBAS", "klip: references kept per integration and zone")),
    Parameter("orientation", "i2d grid: the first exposure's detector orientation (as jwst) or "
              "north up", "detector", "resample.orientation", OneOf(("detector", "north")),
              keyword=("ORIENT", "resample: i2d grid orientation")),
    Parameter("format", "products as FITS files or Zarr stores", "fits", "output.format",
              OneOf(("fits", "zarr")), group=EXECUTION_GROUP),
    Parameter("save_psfalign", "write psfalign (false: only a scratch file of its SCI, which "
              "KLIP reads, removed at the end)", True, "output.psfalign", flag,
              option="--no-psfalign", action="store_false",
              option_help="do not write psfalign: the aligned SCI goes to a scratch file KLIP "
              "reads, removed at the end (half the size of psfalign)",
              commands=("run", "demo"), group=EXECUTION_GROUP,
              keyword=("PSFALIGN", "psfalign products written")),
    Parameter("integrations", "science integrations per block", None, "chunks.integrations",
              Number(low=1), FROM_MEMORY, option="--integrations-per-chunk",
              group=EXECUTION_GROUP),
    Parameter("psfs", "references per alignment block", None, "chunks.psfs", Number(low=1),
              FROM_MEMORY, option="--psfs-per-chunk", group=EXECUTION_GROUP),
    Parameter("outlier_rows", "rows per outlier_detection median slab", None,
              "chunks.outlier-rows", Number(low=1), FROM_MEMORY, option=None),
    # dask's configuration only
    Parameter("klip_tile", "references' share of a KLIP tile (sets its rows; part of the "
              "numerics)", "8 MiB", "chunks.klip-tile", role="setting"),
    Parameter("memory_fraction", "share of a worker's memory limit the block plan fills (dask "
              "spills at 0.7)", 0.65, "chunks.memory-fraction", role="setting"),
    Parameter("tasks_per_thread", "alignment blocks planned per worker thread, at least: a "
              "stop loses the blocks under way, so a run taken up does at most 1/N of the "
              "alignment again", 16, "chunks.alignment-tasks-per-thread",
              role="setting"),
    Parameter("block_least", "aligned frames an alignment block holds at least, where "
              "alignment-tasks-per-thread would cut smaller (a small run's tasks cost more "
              "than a stop loses)", "32 MiB", "chunks.alignment-block-least", role="setting"),
    # where and how a run computes (run_coron3's; the checks: pipeline.run.check_execution)
    Parameter("scheduler", "address of a running dask scheduler, or 'synchronous' / 'threads' "
              "for dask's local schedulers", read=text, role="execution", group=EXECUTION_GROUP),
    Parameter("scheduler_file", "scheduler file of a running dask cluster", read=text,
              role="execution", group=EXECUTION_GROUP),
    Parameter("n_workers", "LocalCluster worker processes", None, "cluster.n-workers",
              Number(low=1), "one per CPU of the allocation", "execution", group=EXECUTION_GROUP),
    Parameter("in_process_below", "a run with less data (inputs and aligned frames) and no "
              "cluster asked for computes in its own process on threads (null: always a "
              "LocalCluster)", "1 GiB", "cluster.in-process-below", role="setting"),
    Parameter("threads_per_worker", "threads of each LocalCluster worker", 1,
              "cluster.threads-per-worker", role="setting"),
    Parameter("memory_limit", "memory limit per LocalCluster worker, e.g. '4GiB' (auto: the "
              "allocation's memory shared among the workers)", "auto",
              "cluster.memory-limit", role="execution", group=EXECUTION_GROUP),
    Parameter("dashboard_address", "where the dashboard listens (loopback: reach it with ssh "
              "-L from a laptop)", "127.0.0.1:8787", "cluster.dashboard-address", role="setting"),
    Parameter("kind", "start a LocalCluster or submit workers through dask-jobqueue, "
              "configured in a jobqueue.yaml (see cluster/)", "local",
              read=OneOf(("local", "slurm", "pbs")), role="execution", option="--cluster",
              group=EXECUTION_GROUP),
    Parameter("jobs", "batch jobs of workers (slurm, pbs)", read=Number(low=1),
              role="execution", group=EXECUTION_GROUP, exclusive="jobs"),
    Parameter("adapt", "adapt between MIN and MAX batch jobs (slurm, pbs)", read=job_range,
              role="execution", group=EXECUTION_GROUP, metavar="MIN:MAX", exclusive="jobs"),
    Parameter("wait_for_workers", "with --scheduler/--scheduler-file/--cluster slurm|pbs: plan "
              "blocks only once N workers have joined (slurm, pbs: by default the workers of "
              "the jobs asked for; 0 in the configuration: no wait)", 1,
              "cluster.wait-for-workers", Number(low=1), role="execution", metavar="N",
              group=EXECUTION_GROUP),
    Parameter("worker_timeout", "seconds to wait for them before the run stops with an error",
              600, "cluster.worker-timeout", role="setting"),
    Parameter("scheduler_timeout", "seconds to wait for a scheduler file to appear and the "
              "scheduler to answer", 60, "cluster.scheduler-timeout", role="setting"),
    Parameter("status_interval", "seconds between the lines a wait or a run logs about where "
              "it is", 30, "cluster.status-interval", role="setting"),
    Parameter("cancel_timeout", "seconds a stopped run waits for its running tasks before it "
              "cleans up", 20, "cluster.cancel-timeout", role="setting"),
    Parameter("progress", "a progress bar on the terminal", True, read=flag, role="execution",
              option="--no-progress", action="store_false", option_help="no progress bar",
              group=EXECUTION_GROUP),
    Parameter("quiet", "say nothing while waiting for the cluster", False, read=flag,
              role="execution", option=None),
    Parameter("report", "save dask's performance report (HTML; distributed clusters)",
              read=path, role="execution", group=EXECUTION_GROUP),
    Parameter("stats", "save where the time went (JSON)", read=path, role="execution",
              group=EXECUTION_GROUP),
    # the contrast curve's injection-recovery (contrast_curve's)
    Parameter("offaxis_psf", "the star unocculted: a FITS image in the calints' units (SCI or "
              "primary)", read=path, role="injection", commands=(*MEASURES, "run"),
              group="injection-recovery", required=MEASURES),
    Parameter("star_flux", "rescale the off-axis PSF to this total flux",
              read=Number(whole=False), role="injection", commands=(*MEASURES, "run"),
              group="injection-recovery", none="as the file has it"),
    Parameter("separations", "companions' separations, arcsec, e.g. 0.5,1,1.5",
              read=numbers_list, none="10 from 3 λ/D to the field's edge", role="injection",
              commands=("contrast",), group="injection-recovery"),
    Parameter("position_angles", "one set of companions per angle, degrees east of north",
              (0.0, 120.0, 240.0), read=numbers_list, role="injection", commands=("contrast",),
              group="injection-recovery"),
    Parameter("inject_contrast", "contrast of the injected companions (KLIP is linear: any "
              "will do)", 1e-4, read=Number(whole=False), role="injection",
              commands=("contrast",), group="injection-recovery"),
    Parameter("resolution", "λ/D in pixels", read=Number(whole=False),
              none="from FILTER's pivot wavelength", role="injection",
              commands=(*MEASURES, "run"),
              group="injection-recovery"),
    Parameter("transmission", "the coronagraph's transmission that dims each injected companion "
              "at its detector place in each roll: 'psfmask' (NIRCam's PSFMASK is the "
              "occulter's), 'none', or a FITS map in the science frames' pixels", read=text,
              none="the PSFMASK for NIRCam, none for MIRI", role="injection",
              commands=(*MEASURES, "run"), group="injection-recovery",
              keyword=("TRANSMIS", "transmission dimming the injections")),
    Parameter("transmission_max", "largest value a transmission map may hold (above it, it is "
              "no transmission)", 1.5, "contrast.transmission-max", role="setting"),
    # a companion's fit (science.companion_fit): its model, noise and sampler
    Parameter("psf_half_width", "half side of the off-axis PSF box a companion's forward model "
              "keeps, λ/D (null: the whole box)", 8.0, "companions.psf-half-width",
              role="setting"),
    Parameter("window_margin", "how far the sampler may move a companion from its start in "
              "each roll, λ/D: the KL images are made on the PSF box and this margin",
              1.0, "companions.window-margin", role="setting"),
    Parameter("align_slack", "ADI fits: how far align_refs' shift of another roll's "
              "integration may differ from the stars' offset in the WCS, λ/D (the negative "
              "injection's window there is widened by it)", 1.0, "companions.align-slack",
              role="setting"),
    Parameter("stamp_radius", "radius of the pixels about the start fitted, λ/D", 2.0,
              "companions.stamp-radius", role="setting"),
    Parameter("annulus_width", "width of the annulus about the star the noise is measured "
              "on, λ/D", 2.0, "companions.annulus-width", role="setting"),
    Parameter("noise_mask", "the companion's pixels left out of the noise annulus: within "
              "this many λ/D of it", 2.0, "companions.noise-mask", role="setting"),
    Parameter("correlation_lag", "largest lag the noise's correlation is fitted to, λ/D",
              3.0, "companions.correlation-lag", role="setting"),
    Parameter("kernel", "the noise's correlation kernel: matern32, sqexp or diagonal (no "
              "correlation)", "matern32", "companions.kernel", role="setting"),
    Parameter("walkers", "emcee's walkers", 32, "companions.walkers", Number(low=2),
              role="companion", commands=FITS, group="companions"),
    Parameter("check_steps", "steps between two estimates of the autocorrelation time", 500,
              "companions.check-steps", role="setting"),
    Parameter("max_steps", "most steps a chain takes, converged or not", 20000,
              "companions.max-steps", Number(low=1), **FITTED),
    Parameter("tau_factor", "a chain is long enough at this many autocorrelation times (τ), "
              "its estimate steady", 50, "companions.tau-factor", role="setting"),
    Parameter("tau_change", "steady: τ changed by less than this fraction between two "
              "estimates", 0.05, "companions.tau-change", role="setting"),
    Parameter("burn_factor", "burn-in, in autocorrelation times", 5,
              "companions.burn-factor", role="setting"),
    Parameter("walker_spread", "the walkers' starting ball, in the maximum-likelihood "
              "point's (Laplace) standard deviations", 0.5, "companions.walker-spread",
              role="setting"),
    Parameter("spread_walkers", "ADI fits on a distributed cluster: each step's walkers "
              "evaluated on its workers (false: in this process)", True,
              "companions.spread-walkers", role="setting"),
    Parameter("seed", "seed of the sampler's random numbers", 1, "companions.seed",
              Number(), **FITTED),
    # which companions are fitted, and what the data's astrometry adds (the companions command)
    Parameter("companions", "after the run, on its cluster: fit each candidate of S/N at least "
              "--min-snr (needs --offaxis-psf) and write the residual i2d", False,
              action="store_true", role="companion", commands=("run",), group="companions",
              option_help="after the run, on its cluster: fit each candidate of S/N at least "
              "--min-snr (needs --offaxis-psf) and write the residual i2d"),
    Parameter("at", "fit a companion starting at SEP,PA (arcsec, degrees east of north; "
              "repeatable)", read=numbers_list, action="append", metavar="SEP,PA",
              none="the candidates of --candidates", **COMPANION),
    Parameter("candidates", "fit a run's candidates (<product>_candidates.ecsv) of S/N at "
              "least --min-snr", read=path, **COMPANION),
    Parameter("min_snr", "least S/N of a candidate fitted", 5.0, "companions.min-snr",
              Number(whole=False, above=0), **FITTED),
    Parameter("kl", "the KL cutoff fitted (one of --truncate's)", read=Number(low=1),
              none="the largest", **FITTED),
    Parameter("star_position_error", "the star's position error, mas (added in quadrature "
              "to the astrometric errors)", 0.0, read=Number(whole=False, low=0), **FITTED),
    Parameter("plate_scale_error", "the plate scale's fractional error (scales the "
              "separation and offsets' errors)", 0.0, read=Number(whole=False, low=0), **FITTED),
)  # fmt: skip
BY_NAME = {parameter.name: parameter for parameter in SPEC}
#: ``build_products``' parameters, in the order provenance records them.
STEPS = tuple(parameter for parameter in SPEC if parameter.role == "step")
EXECUTION = tuple(parameter for parameter in SPEC if parameter.role == "execution")


def said(name: str, value: object = None, *, cli: bool = False) -> str:
    """How a message names parameter ``name`` (set to ``value``, if given): its option on
    the command line (``--cluster slurm``), else its name in Python (``kind='slurm'``)."""
    parameter = BY_NAME[name]
    if cli:
        return parameter.flag if value is None else f"{parameter.flag} {value}"
    return name if value is None else f"{name}={value!r}"


def shown(value: object, none: str | None = None) -> str:
    """A default as the help and the YAML's comments show it."""
    if value is None:
        return none or "none"
    if isinstance(value, tuple | list):
        return ",".join(shown(item) for item in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def defaults() -> dict:
    """The settings under ``coron_dask`` in dask's configuration, with their defaults."""
    tree: dict = {}
    for parameter in SPEC:
        if parameter.key is not None:
            *sections, leaf = parameter.key.split(".")
            node = tree
            for section in sections:
                node = node.setdefault(section, {})
            node[leaf] = defaults_of(parameter)
    return tree


def defaults_of(parameter: Parameter) -> object:
    """``parameter``'s default as dask's configuration holds it (a list for a tuple)."""
    default = parameter.default
    return list(default) if isinstance(default, tuple) else default
