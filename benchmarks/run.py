"""The benchmark suite (``make bench``): coron-dask against jwst 3.0.0 and this machine.

Each scenario simulates a dataset with ``coron-dask simulate``, runs ``coron-dask run`` as a
whole process on a LocalCluster of given workers and memory, and measures wall time, the
peak memory of all its processes together, bytes read and written, and (from ``--stats``)
task time per stage. jwst runs on the same data, as a whole process too: its functions fed
float64 integration by integration for ``each`` mode, its steps as shipped for ``first``
mode. Results go to benchmarks/results/ (JSON, Markdown, PNG).

    python -m benchmarks.run                      # every scenario (about half an hour)
    python -m benchmarks.run --scenario first-sub320 --scenario like-for-like
    python -m benchmarks.run --scenario like-for-like --repeats 5   # median of 5 runs
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from benchmarks.machine import limits
from benchmarks.monitor import Measurement, measure

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
JWST_FUNCTIONS = """
import sys, numpy as np
from pathlib import Path
from tests.jwst_reference import coron3
result = coron3(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
np.savez(sys.argv[4], **{f"{root}/{key}": value for root, arrays in result.items()
                         for key, value in arrays.items() if root != "psfstack"})
"""


@dataclass
class Scenario:
    name: str
    size: int
    sci_exps: int
    sci_ints: int
    psf_exps: int
    psf_ints: int
    align_to: str = "each"
    workers: int | None = 2  # None: as a user runs it (a small run computes in process)
    memory_limit: str | None = "auto"
    jwst: str | None = None  # "functions" or "shipped"
    extra: list[str] = field(default_factory=list)
    instrument: str = "nircam"  # miri: 224 × 288 4QPM frames (size unused)

    @property
    def pairs(self) -> int:
        science = self.sci_exps * (self.sci_ints if self.align_to == "each" else 1)
        return science * self.psf_exps * self.psf_ints

    @property
    def psfalign_bytes(self) -> int:
        written = "--no-psfalign" not in self.extra
        return 2 * 4 * self.pairs * self.pixels if written else 0  # SCI and ERR, float32

    @property
    def pixels(self) -> int:
        return 224 * 288 if self.instrument == "miri" else self.size**2

    @property
    def frame(self) -> str:
        return "224×288" if self.instrument == "miri" else f"{self.size}²"


SCENARIOS = {
    # coron-dask runs the steps jwst runs in each comparison: jwst's functions here include
    # outlier_detection but no resample; jwst's shipped pipeline is run without both
    # issue 12's datasets, run with coron-dask's defaults as a user would
    "like-for-like": Scenario(
        "like-for-like",
        160,
        2,
        20,
        8,
        6,
        "each",
        workers=None,
        memory_limit=None,
        jwst="functions",
        extra=["--skip", "resample"],
    ),
    "first-sub320": Scenario(
        "first-sub320",
        320,
        2,
        10,
        9,
        5,
        "first",
        workers=None,
        memory_limit=None,
        jwst="shipped",
        extra=["--skip", "outlier_detection", "--skip", "resample"],
    ),
    "out-of-core": Scenario("out-of-core", 320, 2, 20, 61, 8, "each", memory_limit="2GiB"),
    # issue 8: 220 references, 2 × 50 integrations (a 9 GB psfalign), workers of each size
    **{
        f"ooc-{limit}": Scenario(
            f"ooc-{limit}", 320, 2, 50, 11, 20, memory_limit=limit, extra=["--truncate", "20"]
        )
        for limit in ("0.75GiB", "1GiB", "2GiB", "4GiB")
    },
    # 1040 references on 1 GiB workers: refused while every worker held the filled
    # references (the plan asked for 3.37 GiB); 2 × 5 integrations (an 8.5 GB psfalign)
    "refs-1GiB": Scenario(
        "refs-1GiB", 320, 2, 5, 16, 65, memory_limit="1GiB", extra=["--truncate", "20"]
    ),
    # issue 26: a library of 2000 references (40 exposures × 50) chosen per integration and
    # zone (the 50 most correlated), 2 × 2 integrations, on 1 GiB workers; without
    # --maxnumbasis the plan refuses them (the Gram matrices of 6 zones need 1.54 GiB)
    "library-2000": Scenario(
        "library-2000",
        320,
        2,
        2,
        40,
        50,
        memory_limit="1GiB",
        extra=["--truncate", "20", "--maxnumbasis", "50", "--annuli", "3", "--subsections", "2"],
    ),
    # MIRI 4QPM at realistic counts, 2 GiB workers: 1040 references; without psfalign
    # 2 × 100 integrations (its psfalign would be 107 GB, more than this machine's disk),
    # with it 2 × 20 (21 GB)
    "miri-no-psfalign": Scenario(
        "miri-no-psfalign",
        0,
        2,
        100,
        16,
        65,
        memory_limit="2GiB",
        extra=["--truncate", "20", "--no-psfalign"],
        instrument="miri",
    ),
    "miri-psfalign": Scenario(
        "miri-psfalign",
        0,
        2,
        20,
        16,
        65,
        memory_limit="2GiB",
        extra=["--truncate", "20"],
        instrument="miri",
    ),
}
SCALING = [Scenario(f"scaling-{n}", 160, 1, n, 8, 5, "each") for n in (10, 20, 40, 80, 160)]


def coron_dask(scenario: Scenario, asn: Path, out: Path, *extra: str) -> tuple[Measurement, dict]:
    stats = out / "stats.json"
    command = [
        sys.executable,
        "-m",
        "coron_dask.cli",
        "run",
        str(asn),
        "-o",
        str(out),
        "--psfmask",
        str(asn.parent / "psfmask.fits"),
        "--align-to",
        scenario.align_to,
        *(["--n-workers", str(scenario.workers)] if scenario.workers else []),
        *(["--memory-limit", scenario.memory_limit] if scenario.memory_limit else []),
        "--no-progress",
        "--stats",
        str(stats),
        *scenario.extra,
        *extra,
    ]
    log = out / "stderr.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as stderr:
        result = measure(command, stdout=subprocess.DEVNULL, stderr=stderr)
    text = log.read_text()
    events = {
        "paused": text.count("Pausing worker"),
        "restarted": text.count("Restarting worker") + text.count("exceeded 95%"),
        "plan": next((line for line in text.splitlines() if "block plan:" in line), ""),
        "refused": text.strip().splitlines()[-1] if result.returncode == 2 else "",
    }
    if result.returncode and not events["refused"]:
        raise RuntimeError(f"coron-dask failed on {scenario.name}: {text[-2000:]}")
    stats_found = json.loads(stats.read_text()) if stats.exists() else {"stages": {}}
    return result, {**stats_found, "events": events}


def jwst(scenario: Scenario, asn: Path, work: Path) -> Measurement:
    mask = asn.parent / "psfmask.fits"
    if scenario.jwst == "functions":
        command = [
            sys.executable,
            "-c",
            JWST_FUNCTIONS,
            str(asn),
            str(mask),
            scenario.align_to,
            str(work / "jwst.npz"),
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "benchmarks.jwst_shipped",
            str(asn),
            str(mask),
            str(work / "jwst"),
        ]
    result = measure(command, stdout=subprocess.DEVNULL)
    if result.returncode:
        raise RuntimeError(f"jwst failed on {scenario.name}")
    return result


def parity(work: Path, out: Path) -> dict:
    """Largest relative L2 difference of psfalign and psfsub SCI from jwst's functions."""
    reference = np.load(work / "jwst.npz")
    worst: dict[str, float] = {}
    for key in reference.files:
        root, name = key.split("/")
        if name not in ("psfalign_sci", "psfsub_sci"):
            continue
        ours = fits.getdata(out / f"{root}_c1000_{name.split('_')[0]}.fits", "SCI")
        expected = reference[key]
        diff = float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))
        worst[name] = max(worst.get(name, 0.0), diff)
    return worst


def identical(first: Path, second: Path) -> bool:
    """Every product the same bit for bit; the i2d, whose block sums follow the blocks, to
    float32 rounding (as the tests' rule)."""
    for path in sorted(first.glob("*.fits")):
        with fits.open(path) as a, fits.open(second / path.name) as b:
            for hdu in a[1:]:
                ours, theirs = hdu.data, b[hdu.name].data
                if path.name.endswith("_i2d.fits"):
                    scale = np.nanmax(np.abs(theirs))
                    if not np.allclose(ours, theirs, rtol=1e-5, atol=1e-6 * scale, equal_nan=True):
                        return False
                elif not np.array_equal(ours, theirs, equal_nan=True):
                    return False
    return True


def simulate(scenario: Scenario, folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "coron_dask.cli",
        "simulate",
        str(folder),
        "--size",
        str(scenario.size or 128),
        "--instrument",
        scenario.instrument,
        "--sci-exps",
        str(scenario.sci_exps),
        "--sci-ints",
        str(scenario.sci_ints),
        "--psf-exps",
        str(scenario.psf_exps),
        "--psf-ints",
        str(scenario.psf_ints),
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return next(folder.glob("*_asn.json"))


def small_blocks(scenario: Scenario, asn: Path, root: Path) -> tuple[Path, float]:
    """The products of a run with small blocks (1 integration × 16 references), made once
    per simulated dataset (the simulation is seeded) and shared by the scenarios that
    differ only in their workers; with the seconds that run took."""
    data = (scenario.instrument, scenario.size, scenario.sci_exps, scenario.sci_ints)
    data += (scenario.psf_exps, scenario.psf_ints, *scenario.extra)
    folder = root / ("small-blocks-" + "-".join(map(str, data)))
    done = folder / "seconds"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        options = ["--integrations-per-chunk", "1", "--psfs-per-chunk", "16"]
        small, _ = coron_dask(scenario, asn, folder, *options)
        done.write_text(str(small.seconds))
    return folder, float(done.read_text())


def _bases(scenario: Scenario) -> int:
    """KL bases of a scenario: one per science integration, or per exposure (``first``)."""
    return scenario.sci_exps * (scenario.sci_ints if scenario.align_to == "each" else 1)


def klip_flops(scenario: Scenario) -> int:
    """KLIP's floating-point operations (see ``stage_floors``)."""
    ny, nx = (224, 288) if scenario.instrument == "miri" else (scenario.size,) * 2
    nrefs = scenario.psf_exps * scenario.psf_ints
    options = dict(zip(scenario.extra[::2], scenario.extra[1::2], strict=False))
    truncate = int(options.get("--truncate", 50))
    below = truncate if truncate < nrefs else 0
    per_basis = (nrefs**2 + 4 * below * nrefs) * ny * nx
    per_target = 4 * nrefs * ny * nx
    return _bases(scenario) * per_basis + scenario.sci_exps * scenario.sci_ints * per_target


def stage_floors(scenario: Scenario, machine: dict, plan: tuple[int, int], written: int) -> dict:
    """Each stage's floor in task seconds at this machine's single-thread rates: the FFTs
    and matrix products coron-dask's algorithms cannot do without, none of their overheads
    (the roofline is the floors' sum over the cores). ``plan``: the alignment blocks'
    integrations and references.

    - fit: per alignment task, one real FFT of each reference; per science frame, one of
      the frame and two on its doubled grid (four times the pixels each); per pair, the
      matrix products of the start and of two Newton evaluations (the fewest that end a
      fit: one at the start, one after its step), complex flops at the matmul rate;
    - shift: per pair, an inverse real FFT of SCI and one of ERR; per task, each
      reference's two forward ones; and the aligned blocks written (SCI, and ERR with a
      psfalign) at the page cache's rate, as the shift tasks write them;
    - klip: per basis, the Gram matrix (p²·npix, symmetric) and, when a cutoff is below p,
      the ERR's KL images and projections (4·K·p·npix); per target, its overlaps with the
      references and its projection (2·p·npix each per cutoff), at the matmul rate; and
      the aligned references read back once (4 bytes a pixel) at the page cache's rate;
    - write products: the other bytes of the products (``written``), at the disk's rate.
    The fill, outlier_detection and reads have none here."""
    ny, nx = (224, 288) if scenario.instrument == "miri" else (scenario.size,) * 2
    fft_ms = machine["fft_ms_160"] if ny * nx <= 160**2 else machine["fft_ms_320"]
    unit = fft_ms / 1e3 * ny * nx / (160**2 if ny * nx <= 160**2 else 320**2)  # one FFT
    matmul = machine["matmul_gflops_1_thread"] * 1e9
    integrations, psfs = plan
    targets = integrations if scenario.align_to == "each" else 1  # per alignment task
    ky, kx = ny + 1, nx // 2 + 1  # the fit's split frequencies (k_x >= 0)
    qy, qx = 2 * ny + 1, nx + 1  # and doubled, for the energy
    start = 8 * ky * kx * 7 + 6 * ky * kx
    evaluation = 8 * 3 * (qy * qx + ky * kx)
    fit_pair = (start + 2 * evaluation) / matmul + unit * (9 / psfs + 1 / targets)
    aligned = scenario.psfalign_bytes or 4 * scenario.pairs * ny * nx  # or the scratch SCI
    nrefs = scenario.psf_exps * scenario.psf_ints
    klip_read = _bases(scenario) * nrefs * ny * nx * 4 / (machine["read_back_gbps"] * 1e9)
    return {
        "align_refs: shift fit": scenario.pairs * fit_pair,
        "align_refs: shift": scenario.pairs * unit * (2 + 2 / targets)
        + aligned / (machine["cache_write_gbps"] * 1e9),
        "klip": klip_flops(scenario) / matmul + klip_read,
        "write products": max(written - scenario.psfalign_bytes, 0)
        / 1e6
        / machine["disk_write_mbps"],
    }


def products_bytes(folder: Path) -> int:
    """Bytes of the products a run left in ``folder``: what its writes put on disk (the
    processes' write counters also count what workers send each other over sockets)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def stage_table(rows: list[dict]) -> str:
    """Task seconds of each stage against its floor, for the scenarios run now."""
    lines = ["| scenario | stage | task seconds | floor | × floor |", "|---|---|---|---|---|"]
    for row in rows:
        for stage, floor in row.get("floors", {}).items():
            seconds = row["stages"].get(stage, {}).get("seconds", 0.0)
            ratio = f"{seconds / floor:.1f}" if floor else "–"
            name = row["scenario"]["name"]
            lines.append(f"| {name} | {stage} | {seconds:.2f} | {floor:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def run_scenario(
    scenario: Scenario, root: Path, machine: dict, verify_chunks: bool, repeats: int = 1
) -> dict:
    """One scenario's row. coron-dask runs ``repeats`` times, the first before jwst and the
    others after it, and the run of median wall time (the lower middle one of an even
    count) is reported, with its stages: this shared machine's rates drift by tens of
    percent over minutes, a single short run samples one moment of that drift."""
    work = root / scenario.name
    shutil.rmtree(work, ignore_errors=True)
    asn = simulate(scenario, work / "inputs")
    runs = [coron_dask(scenario, asn, work / "out")]
    ours, stats = runs[0]
    if stats["events"]["refused"]:
        row = {"scenario": asdict(scenario), "commit": commit(), "events": stats["events"]}
        print(json.dumps(row, default=str), flush=True)
        shutil.rmtree(work, ignore_errors=True)
        return row
    theirs = jwst(scenario, asn, work) if scenario.jwst else None
    for _ in range(repeats - 1):
        shutil.rmtree(work / "out")
        runs.append(coron_dask(scenario, asn, work / "out"))
    ours, stats = sorted(runs, key=lambda run: run[0].seconds)[(len(runs) - 1) // 2]
    row = {
        "scenario": asdict(scenario),
        "commit": commit(),
        "coron_dask_runs_s": [run[0].seconds for run in runs],
        "pairs": scenario.pairs,
        "psfalign_gb": scenario.psfalign_bytes / 1e9,
        "coron_dask": {k: v for k, v in asdict(ours).items() if k != "trace"},
        "stages": stats["stages"],
        "workers_lost": stats.get("workers_lost"),
        "events": stats["events"],
        "memory_limit_total": stats.get("memory_limit_per_worker", 0) * stats.get("workers", 0),
    }
    fit = stats["stages"].get("align_refs: shift fit", {"seconds": 0})
    row["frames_aligned_per_s"] = scenario.pairs / ours.seconds
    row["fit_ms_per_frame_task"] = 1e3 * fit["seconds"] / scenario.pairs
    plan = re.search(r"(\d+) integration\(s\) × (\d+) reference", stats["events"]["plan"])
    row["plan"] = [int(plan[1]), int(plan[2])]
    row["products_bytes"] = products_bytes(work / "out")  # the same for every run
    row["floors"] = stage_floors(scenario, machine, row["plan"], row["products_bytes"])
    klip = stats["stages"].get("klip", {"seconds": 0})
    klip_gflop = klip_flops(scenario) / 1e9
    row["klip_gflops"] = klip_gflop / klip["seconds"] if klip["seconds"] else None
    row["roofline_s"] = sum(row["floors"].values()) / machine["cores"]
    row["over_roofline"] = ours.seconds / row["roofline_s"]
    if theirs is not None:
        row["jwst"] = {k: v for k, v in asdict(theirs).items() if k != "trace"}
        row["speedup"] = theirs.seconds / ours.seconds
        if scenario.jwst == "functions":
            row["parity"] = parity(work, work / "out")
    if verify_chunks:
        small, seconds = small_blocks(scenario, asn, root)
        row["identical_to_small_chunks"] = identical(work / "out", small)
        row["small_chunks_seconds"] = seconds
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in row.items() if k != "scenario"}, default=str), flush=True)
    return row


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [
        f"Machine: {machine['cores']} cores, float64 matmul {machine['matmul_gflops_1_thread']} "
        f"GFLOP/s per thread, real FFT {machine['fft_ms_160']} ms (160²) / "
        f"{machine['fft_ms_320']} ms (320²), disk {machine['disk_write_mbps']} MB/s, read back "
        f"{machine['read_back_gbps']} GB/s, page cache writes {machine.get('cache_write_gbps')} "
        f"GB/s ({machine.get('fresh_write_gbps', '–')} GB/s into memory not used lately).",
        "",
        "| scenario | frames | psfalign | coron-dask | jwst | speed-up | peak memory | "
        "limit | largest worker | frames/s | KLIP GFLOP/s | × roofline | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["scenario"]
        if row.get("events", {}).get("refused"):
            lines.append(f"| {s['name']} | refused up front: {row['events']['refused']} |")
            continue
        jwst_s = f"{row['jwst']['seconds']:.1f} s" if "jwst" in row else "–"
        speedup = f"{row['speedup']:.1f}×" if "speedup" in row else "–"
        limit = f"{row['memory_limit_total'] / GIB:.1f} GiB" if s["workers"] else "in process"
        klip = f"{row['klip_gflops']:.1f}" if row.get("klip_gflops") else "–"
        # rows measured before the per-stage floors priced their roofline otherwise
        roofline = f"{row['over_roofline']:.1f}" if row.get("floors") else "–"
        lines.append(
            f"| {s['name']} ({Scenario(**s).frame}, {s['sci_exps']}×{s['sci_ints']} sci, "
            f"{s['psf_exps']}×{s['psf_ints']} ref, {s['align_to']}) | {row['pairs']} | "
            f"{row['psfalign_gb']:.2f} GB | {row['coron_dask']['seconds']:.1f} s | {jwst_s} | "
            f"{speedup} | {row['coron_dask']['peak_memory'] / GIB:.2f} GiB | {limit} | "
            f"{worker_share(row)} | "
            f"{row['frames_aligned_per_s']:.0f} | {klip} | {roofline} | {row.get('commit', '–')} |"
        )
    return "\n".join(lines) + "\n"


def worker_share(row: dict) -> str:
    """The largest worker's peak as a share of its memory limit (dask spills at 0.70)."""
    peak = row["coron_dask"].get("peak_worker")
    per_worker = row["memory_limit_total"] / max(1, row["scenario"]["workers"] or 1)
    return f"{peak / per_worker:.2f} of limit" if peak and per_worker else "–"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scaling = [r for r in rows if r["scenario"]["name"].startswith("scaling")]
    if not scaling:
        return
    nints = [r["scenario"]["sci_ints"] for r in scaling]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(nints, [r["coron_dask"]["seconds"] for r in scaling], "o-", label="wall time")
    left.plot(nints, [r["roofline_s"] for r in scaling], "--", label="roofline")
    left.set(xlabel="science integrations", ylabel="seconds", title="time (160², 40 refs)")
    left.legend()
    right.plot(nints, [r["coron_dask"]["peak_memory"] / GIB for r in scaling], "o-")
    right.set(xlabel="science integrations", ylabel="GiB", title="peak memory, all processes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def merged(rows: list[dict]) -> list[dict]:
    """Earlier results of the scenarios not run now, then these, in scenario order."""
    path = RESULTS / "results.json"
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    fresh = {row["scenario"]["name"] for row in rows}
    order = [*SCENARIOS, *(s.name for s in SCALING)]
    kept = [row for row in earlier if row["scenario"]["name"] not in fresh]
    return sorted(kept + rows, key=lambda row: order.index(row["scenario"]["name"]))


def commit() -> str:
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=[*SCENARIOS, "scaling"])
    parser.add_argument("--workdir", type=Path, default=None, help="where datasets go")
    parser.add_argument(
        "--repeats", type=int, default=1, help="coron-dask runs per scenario (median reported)"
    )
    args = parser.parse_args()
    chosen = args.scenario or [*SCENARIOS, "scaling"]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="coron-dask-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    machine = limits(str(root))
    print(json.dumps(machine), flush=True)
    rows = []
    for name in chosen:
        for scenario in SCALING if name == "scaling" else [SCENARIOS[name]]:
            verify = name == "out-of-core" or name.startswith("ooc-")
            rows.append(run_scenario(scenario, root, machine, verify, args.repeats))
    for folder in root.glob("small-blocks-*"):
        shutil.rmtree(folder)
    RESULTS.mkdir(exist_ok=True)
    rows = merged(rows)
    (RESULTS / "results.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=2, default=str)
    )
    (RESULTS / "results.md").write_text(markdown(rows, machine))
    (RESULTS / "stages.md").write_text(stage_table([r for r in rows if "floors" in r]))
    plot(rows, RESULTS / "scaling.png")
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
