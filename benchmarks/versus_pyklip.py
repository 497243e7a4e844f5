"""coron-dask against pyKLIP: the same KLIP reduction in annuli × subsections, RDI and
ADI+RDI, on this machine, time and peak memory side by side, and how far their psfsubs are
apart.

coron-dask runs whole (``coron-dask run --align-to first --mode M`` with zones:
outlier_detection, the reference stack, the alignment, KLIP; no resample), as a user runs
it. pyKLIP's ``klip_dataset`` (its own parallelism: a process pool of every CPU) then
reduces the frames coron-dask's KLIP subtracted from, one science exposure at a time, not
derotated: the exposure's integrations filled as align_refs fills them, and the references
as coron-dask aligned them to its first integration (``--align-to first``: one set for
every integration, as pyKLIP's one PSF library). RDI: the reference star's frames are the
PSFLibrary. ADI+RDI: the exposure's integrations and the other roll's (psfalign's ADI
planes: filled, and aligned to this exposure by coron-dask's fit) are one GenericData with
their rolls as parallactic angles, so pyKLIP's own ADI takes the other roll's frames zone by
zone by ``movement``; the reference star's frames are the PSFLibrary. pyKLIP reduces every
frame of its dataset, the other roll's too: in ADI+RDI it reduces twice the frames
coron-dask does, and only the exposure's own are compared. So pyKLIP's time is its KLIP
alone; coron-dask's whole run does more (its KLIP stage's task seconds are given too). Peak
memory is that of each command's whole process tree (proportional sets); the machine's load
(1-minute average) is recorded before and after each command, as other work may share it.

    python -m benchmarks.versus_pyklip                   # the demo's size and 320², both modes
    python -m benchmarks.versus_pyklip --scenario demo --mode ADI+RDI

Results: benchmarks/results/versus-pyklip.json and .md (a run replaces the rows of the
scenarios and modes it measured). Exit 1 if a psfsub differs from pyKLIP's by more than
``--tolerance`` (relative L2) or leaves other pixels unreduced (NaN).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.monitor import measure
from benchmarks.run import Scenario, coron_dask, simulate

RESULTS = Path(__file__).parent / "results"
#: simulated observations: the demo's size, and 320² with 2 × 50 integrations, 220 references
SCENARIOS = {
    "demo": {"size": 128, "sci_ints": 8, "psf_exps": 9, "psf_ints": 5},
    "320": {"size": 320, "sci_ints": 50, "psf_exps": 11, "psf_ints": 20},
}
MODES = ("RDI", "ADI+RDI")
#: the reduction both make (``movement``: pyKLIP's default, pixels; ADI only)
ZONES = {"annuli": 5, "subsections": 4, "annuli_spacing": "constant", "iwa": 4.0}
NUMBASIS = (5, 10, 20)
MOVEMENT = 3.0
#: the issue's bound on the psfsubs' relative difference
TOLERANCE = 1e-3

PYKLIP = """
import ctypes, json, sys, time
from pathlib import Path
import numpy as np
from astropy.io import fits
from pyklip import parallelized, rdi
from pyklip.instruments.Instrument import GenericData
from coron_dask import open_product
from coron_dask.io.fits import open_exposure
from coron_dask.pipeline.build import exposure_zones
from coron_dask.steps.align_refs import median_replace_img
from coron_dask.steps.references import roll_angle

out, work, zones_json, numbasis = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
mode, movement = sys.argv[5], float(sys.argv[6])
p = json.loads(zones_json)
numbasis = [int(k) for k in numbasis.split(",")]
seconds, outputs, reduced = 0.0, {}, 0
for crfints in sorted(out.glob("*_crfints.fits")):
    root = crfints.name.replace("_crfints.fits", "")
    psfalign = out / f"{root}_psfalign.fits"
    if not psfalign.exists():
        continue  # a reference exposure
    science = median_replace_img(open_exposure(crfints))  # as coron-dask's KLIP has it
    own = science["sci"].values.astype(np.float64)
    planes = open_product(psfalign)["SCI"].values.astype(np.float64)
    with fits.open(psfalign) as hdul:  # 3-D psfalign: one row per plane; RDI: no KIND
        table = hdul["ALIGN"].data
        kinds = table["KIND"] if "KIND" in table.names else np.full(len(planes), "RDI")
        rolls = table["ROLL"] if "ROLL" in table.names else np.full(len(planes), np.nan)
    adi, refs = planes[kinds == "ADI"], planes[kinds == "RDI"]
    frames = np.concatenate([own, adi])  # ADI+RDI: the other roll's, aligned to this one
    parangs = np.concatenate([np.full(len(own), roll_angle(science)), rolls[kinds == "ADI"]])
    zones = exposure_zones(science, {**p, "owa": None})
    m, n = len(frames), len(refs)
    names = [f"sci{i}" for i in range(m)]
    dataset = GenericData(
        frames, np.tile(zones.star, (m, 1)), parangs=parangs, IWA=p["iwa"], filenames=names
    )
    library = rdi.PSFLibrary(
        np.concatenate([frames, refs]), zones.star, names + [f"ref{j}" for j in range(n)],
        correlation_matrix=np.eye(m + n),  # unused: every reference is used
    )
    library.prepare_library(dataset)
    start = time.perf_counter()
    parallelized.klip_dataset(
        dataset, mode=mode, outputdir=str(work), fileprefix=root, annuli=p["annuli"],
        subsections=p["subsections"], annuli_spacing=p["annuli_spacing"], numbasis=numbasis,
        movement=movement, maxnumbasis=m + n, corr_smooth=0, psf_library=library,
        skip_derot=True, dtype=ctypes.c_double, verbose=False,
    )
    seconds += time.perf_counter() - start
    reduced += m
    np.save(work / f"{root}.npy", dataset.output[:, : len(own), 0].astype(np.float32))
    outputs[root] = str(work / f"{root}.npy")
said = {"klip_seconds": seconds, "outputs": outputs, "frames_reduced": reduced}
(work / "said.json").write_text(json.dumps(said))
"""


def difference(out: Path, outputs: dict) -> tuple[float, int]:
    """The largest relative L2 difference of pyKLIP's psfsub from coron-dask's, over the
    science exposures, where both are finite; and how many pixels one leaves NaN (not
    reduced) and the other does not."""
    import numpy as np

    from coron_dask import open_product

    worst, nan_apart = 0.0, 0
    for root, path in outputs.items():
        ours = open_product(out / f"{root}_psfsub.fits")["SCI"].values
        theirs = np.load(path)
        both = np.isfinite(ours) & np.isfinite(theirs)
        nan_apart += int((np.isfinite(ours) != np.isfinite(theirs)).sum())
        apart = np.linalg.norm(ours[both] - theirs[both]) / np.linalg.norm(theirs[both])
        worst = max(worst, float(apart))
    return worst, nan_apart


def load() -> float:
    """The machine's load, its 1-minute average: how busy the shared cores were."""
    return round(os.getloadavg()[0], 2)


def zone_options(mode: str) -> list[str]:
    """coron-dask's options for the reduction both make."""
    options = ["--skip", "resample", "--truncate", ",".join(map(str, NUMBASIS))]
    for key, value in ZONES.items():
        options += [f"--{key.replace('_', '-')}", str(value)]
    options += ["--mode", mode, "--no-progress"]
    return options + (["--movement", str(MOVEMENT)] if "ADI" in mode else [])


def scenario(name: str, **options) -> Scenario:
    """The benchmark suite's description of scenario ``name``: two science exposures."""
    sizes = SCENARIOS[name]
    shape = (sizes["size"], 2, sizes["sci_ints"], sizes["psf_exps"], sizes["psf_ints"])
    return Scenario(name, *shape, **options)


def run_case(name: str, mode: str, asn: Path, root: Path) -> dict:
    """coron-dask then pyKLIP on the simulated ``asn`` in ``mode``, measured."""
    sizes = SCENARIOS[name]
    tag = f"{name}-{mode.replace('+', '')}"
    out, work = root / f"{tag}-out", root / f"{tag}-pyklip"
    as_run = scenario(name, align_to="first", workers=None, memory_limit=None)
    as_run.extra = zone_options(mode)  # as a user runs it: dask's defaults
    ours_load = load()
    ours, stats = coron_dask(as_run, asn, out)
    ours_load = (ours_load, load())
    if ours.returncode:
        raise RuntimeError(f"coron-dask refused {tag}: {stats['events']['refused']}")
    work.mkdir()
    options = [json.dumps(ZONES), ",".join(map(str, NUMBASIS)), mode, str(MOVEMENT)]
    command = [sys.executable, "-c", PYKLIP, str(out), str(work), *options]
    theirs_load = load()
    with open(work / "stderr.log", "w") as stderr:
        theirs = measure(command, stdout=subprocess.DEVNULL, stderr=stderr)
    theirs_load = (theirs_load, load())
    if theirs.returncode:
        raise RuntimeError(f"pyKLIP failed: {(work / 'stderr.log').read_text()[-3000:]}")
    said = json.loads((work / "said.json").read_text())
    apart, nan_apart = difference(out, said["outputs"])
    row = {
        "scenario": name,
        "mode": mode,
        **sizes,
        "references": sizes["psf_exps"] * sizes["psf_ints"],
        "movement": MOVEMENT if "ADI" in mode else None,
        "cpus": os.cpu_count(),
        "coron_dask_seconds": round(ours.seconds, 1),
        "coron_dask_klip_task_seconds": round(stats["stages"].get("klip", {}).get("seconds", 0), 1),
        "coron_dask_peak_gib": round(ours.peak_memory / 2**30, 2),
        "coron_dask_load": ours_load,
        "pyklip_seconds": round(theirs.seconds, 1),
        "pyklip_klip_seconds": round(said["klip_seconds"], 1),
        "pyklip_frames_reduced": said["frames_reduced"],
        "pyklip_peak_gib": round(theirs.peak_memory / 2**30, 2),
        "pyklip_load": theirs_load,
        "psfsub_relative_difference": apart,
        "psfsub_nan_apart": nan_apart,
    }
    shutil.rmtree(out)
    shutil.rmtree(work)
    return row


def run_scenario(name: str, modes: list[str], root: Path) -> list[dict]:
    """Each of ``modes`` on one simulation of scenario ``name``, each row saved as it is
    measured (a long run's first rows survive a failure of its last)."""
    inputs = root / f"{name}-inputs"
    asn = simulate(scenario(name), inputs)
    rows = []
    for mode in modes:
        rows.append(run_case(name, mode, asn, root))
        save(rows)
    shutil.rmtree(inputs)
    return rows


def save(rows: list[dict]) -> str:
    """Write ``rows`` with the saved rows of the scenarios and modes they do not measure to
    the results (JSON, Markdown); the table."""
    path = RESULTS / "versus-pyklip.json"
    saved = json.loads(path.read_text()) if path.exists() else []
    measured = {(r["scenario"], r["mode"]) for r in rows}
    kept = [r for r in saved if "mode" in r and (r["scenario"], r["mode"]) not in measured]
    order = {(s, m): i for i, (s, m) in enumerate((s, m) for s in SCENARIOS for m in MODES)}
    every = sorted(kept + rows, key=lambda r: order[r["scenario"], r["mode"]])
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(every, indent=1))
    table = markdown(every)
    (RESULTS / "versus-pyklip.md").write_text(table)
    return table


def markdown(rows: list[dict]) -> str:
    zones = ", ".join(f"{k} {v}" for k, v in ZONES.items())
    lines = [
        "# coron-dask against pyKLIP (`python -m benchmarks.versus_pyklip`)",
        "",
        f"KLIP in zones ({zones}), KL modes {','.join(map(str, NUMBASIS))}, RDI and ADI+RDI "
        f"(movement {MOVEMENT:g} px; two rolls 10° apart), on this machine "
        f"({rows[0]['cpus']} CPUs, **shared**: other sessions ran on it, its 1-minute load "
        "average before → after each command is given). coron-dask: the whole run "
        "(outlier_detection, stack, alignment, KLIP; no resample), `--align-to first`; "
        "pyKLIP: `klip_dataset` on the frames coron-dask's KLIP subtracted from, its own "
        "process pool, one science exposure at a time. In ADI+RDI pyKLIP's dataset is the "
        "exposure's integrations and the other roll's (as coron-dask aligned them to it), and "
        "pyKLIP reduces them all: twice the frames coron-dask reduces (column 'frames "
        "reduced'); only the exposure's own are compared. Peak memory: the process tree's. "
        "psfsub difference: the largest relative L2 difference of an exposure's KL-mode cube "
        "where both are finite; "
        + (
            "both leave the same pixels unreduced (NaN) in every row."
            if not any(r["psfsub_nan_apart"] for r in rows)
            else "pixels NaN in one only: "
            + ", ".join(f"{r['scenario']} {r['mode']} {r['psfsub_nan_apart']}" for r in rows)
            + "."
        ),
        "",
        "| scenario | mode | frames | science × references | coron-dask whole run "
        "| its KLIP (task s) | peak | load | pyKLIP klip_dataset | frames reduced | peak "
        "| load | psfsub difference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours_load, theirs_load = (
            " → ".join(f"{v:.1f}" for v in r[k]) for k in ("coron_dask_load", "pyklip_load")
        )
        references = r["references"]
        if "ADI" in r["mode"]:
            references = f"({references} + {r['sci_ints']} ADI)"
        lines.append(
            f"| {r['scenario']} | {r['mode']} | {r['size']}² | 2 × {r['sci_ints']} × "
            f"{references} | {r['coron_dask_seconds']} s | "
            f"{r['coron_dask_klip_task_seconds']} | {r['coron_dask_peak_gib']} GiB | "
            f"{ours_load} | {r['pyklip_klip_seconds']} s | {r['pyklip_frames_reduced']} | "
            f"{r['pyklip_peak_gib']} GiB | {theirs_load} | "
            f"{r['psfsub_relative_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument("--mode", action="append", choices=MODES, help="default: both")
    parser.add_argument("--work", type=Path, help="where to simulate and run (default: a temp)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help="exit 1 if a psfsub differs from pyKLIP's by more (relative L2)",
    )
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="versus-pyklip-", dir=args.work))
    modes = args.mode or list(MODES)
    try:
        rows = [
            row
            for name in args.scenario or list(SCENARIOS)
            for row in run_scenario(name, modes, root)
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(save(rows))
    apart = [
        r for r in rows if r["psfsub_relative_difference"] > args.tolerance or r["psfsub_nan_apart"]
    ]
    for r in apart:
        print(
            f"versus_pyklip: {r['scenario']} {r['mode']}: psfsub "
            f"{r['psfsub_relative_difference']:.1e} from pyKLIP's (--tolerance "
            f"{args.tolerance:g}), {r['psfsub_nan_apart']} pixels NaN in one only",
            file=sys.stderr,
        )
    return 1 if apart else 0


if __name__ == "__main__":
    sys.exit(main())
