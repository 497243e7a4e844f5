"""coron-dask against pyKLIP: the same KLIP reduction in annuli × subsections, on this
machine, time and peak memory side by side, and how far their psfsubs are apart.

coron-dask runs whole (``coron-dask run --align-to first`` with zones: outlier_detection,
the reference stack, the alignment, KLIP; no resample), as a user runs it. pyKLIP's
``klip_dataset`` (its own parallelism: a process pool of every CPU) then reduces the
frames coron-dask's KLIP subtracted from (each science exposure filled as align_refs fills
it, its references as coron-dask aligned them to its first integration: pyKLIP's RDI has
one library for every frame), one science exposure at a time, not derotated. So pyKLIP's
time is its KLIP alone; coron-dask's whole run does more (its KLIP stage's task seconds are
given too). Peak memory is that of each command's whole process tree (proportional sets).

    python -m benchmarks.versus_pyklip                   # the demo's size and 320²
    python -m benchmarks.versus_pyklip --scenario demo

Results: benchmarks/results/versus-pyklip.json and .md. RDI only for now: ADI+RDI follows
``--mode`` (issue 26).
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

RESULTS = Path(__file__).parent / "results"
#: simulated observations: the demo's size, and 320² with 2 × 50 integrations, 220 references
SCENARIOS = {
    "demo": {"size": 128, "sci_ints": 8, "psf_exps": 9, "psf_ints": 5},
    "320": {"size": 320, "sci_ints": 50, "psf_exps": 11, "psf_ints": 20},
}
#: the reduction both make
ZONES = {"annuli": 5, "subsections": 4, "annuli_spacing": "constant", "iwa": 4.0}
NUMBASIS = (5, 10, 20)

PYKLIP = """
import ctypes, json, sys, time
from pathlib import Path
import numpy as np
from pyklip import parallelized, rdi
from pyklip.instruments.Instrument import GenericData
from coron_dask import open_product
from coron_dask.io.fits import open_exposure
from coron_dask.pipeline.build import exposure_zones
from coron_dask.steps.align_refs import median_replace_img

out, work, zones_json, numbasis = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
p = json.loads(zones_json)
numbasis = [int(k) for k in numbasis.split(",")]
seconds, outputs = 0.0, {}
for crfints in sorted(out.glob("*_crfints.fits")):
    root = crfints.name.replace("_crfints.fits", "")
    psfalign = out / f"{root}_psfalign.fits"
    if not psfalign.exists():
        continue  # a reference exposure
    science = median_replace_img(open_exposure(crfints))  # as coron-dask's KLIP has it
    frames = science["sci"].values.astype(np.float64)
    refs = open_product(psfalign)["SCI"].values.astype(np.float64)
    zones = exposure_zones(science, {**p, "owa": None})
    m, n = len(frames), len(refs)
    names = [f"sci{i}" for i in range(m)]
    dataset = GenericData(frames, np.tile(zones.star, (m, 1)), IWA=p["iwa"], filenames=names)
    library = rdi.PSFLibrary(
        np.concatenate([frames, refs]), zones.star, names + [f"ref{j}" for j in range(n)],
        correlation_matrix=np.eye(m + n),
    )
    library.prepare_library(dataset)
    start = time.perf_counter()
    parallelized.klip_dataset(
        dataset, mode="RDI", outputdir=str(work), fileprefix=root, annuli=p["annuli"],
        subsections=p["subsections"], annuli_spacing=p["annuli_spacing"], numbasis=numbasis,
        maxnumbasis=n, corr_smooth=0, psf_library=library, skip_derot=True,
        dtype=ctypes.c_double, verbose=False,
    )
    seconds += time.perf_counter() - start
    np.save(work / f"{root}.npy", dataset.output[:, :, 0].astype(np.float32))
    outputs[root] = str(work / f"{root}.npy")
(work / "said.json").write_text(json.dumps({"klip_seconds": seconds, "outputs": outputs}))
"""


def coron_dask_run(asn: Path, out: Path) -> tuple[object, dict]:
    """coron-dask's whole run of ``asn`` into ``out``, measured, with its --stats."""
    stats = out / "stats.json"
    command = [
        sys.executable,
        "-m",
        "coron_dask",
        "run",
        str(asn),
        "-o",
        str(out),
        "--psfmask",
        str(asn.parent / "psfmask.fits"),
        "--align-to",
        "first",
        "--skip",
        "resample",
        "--truncate",
        ",".join(map(str, NUMBASIS)),
        "--annuli",
        str(ZONES["annuli"]),
        "--subsections",
        str(ZONES["subsections"]),
        "--annuli-spacing",
        ZONES["annuli_spacing"],
        "--iwa",
        str(ZONES["iwa"]),
        "--no-progress",
        "--stats",
        str(stats),
    ]
    out.mkdir(parents=True)
    result = measure(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode:
        raise RuntimeError(f"coron-dask failed ({result.returncode})")
    return result, json.loads(stats.read_text())


def difference(out: Path, outputs: dict) -> float:
    """The largest relative L2 difference of pyKLIP's psfsub from coron-dask's, over the
    science exposures, where both are finite."""
    import numpy as np

    from coron_dask import open_product

    worst = 0.0
    for root, path in outputs.items():
        ours = open_product(out / f"{root}_psfsub.fits")["SCI"].values
        theirs = np.load(path)
        both = np.isfinite(ours) & np.isfinite(theirs)
        worst = max(
            worst, float(np.linalg.norm(ours[both] - theirs[both]) / np.linalg.norm(theirs[both]))
        )
    return worst


def run_scenario(name: str, root: Path) -> dict:
    sizes = SCENARIOS[name]
    inputs, out, work = root / f"{name}-inputs", root / f"{name}-out", root / f"{name}-pyklip"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "coron_dask",
            "simulate",
            str(inputs),
            "--size",
            str(sizes["size"]),
            "--sci-ints",
            str(sizes["sci_ints"]),
            "--psf-exps",
            str(sizes["psf_exps"]),
            "--psf-ints",
            str(sizes["psf_ints"]),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    asn = next(inputs.glob("*_asn.json"))
    ours, stats = coron_dask_run(asn, out)
    work.mkdir()
    command = [
        sys.executable,
        "-c",
        PYKLIP,
        str(out),
        str(work),
        json.dumps(ZONES),
        ",".join(map(str, NUMBASIS)),
    ]
    with open(work / "stderr.log", "w") as stderr:
        theirs = measure(command, stdout=subprocess.DEVNULL, stderr=stderr)
    if theirs.returncode:
        raise RuntimeError(f"pyKLIP failed: {(work / 'stderr.log').read_text()[-3000:]}")
    said = json.loads((work / "said.json").read_text())
    return {
        "scenario": name,
        **sizes,
        "references": sizes["psf_exps"] * sizes["psf_ints"],
        "cpus": os.cpu_count(),
        "coron_dask_seconds": round(ours.seconds, 1),
        "coron_dask_klip_task_seconds": round(stats["stages"].get("klip", {}).get("seconds", 0), 1),
        "coron_dask_peak_gib": round(ours.peak_memory / 2**30, 2),
        "pyklip_seconds": round(theirs.seconds, 1),
        "pyklip_klip_seconds": round(said["klip_seconds"], 1),
        "pyklip_peak_gib": round(theirs.peak_memory / 2**30, 2),
        "psfsub_relative_difference": difference(out, said["outputs"]),
    }


def markdown(rows: list[dict]) -> str:
    zones = ", ".join(f"{k} {v}" for k, v in ZONES.items())
    lines = [
        "# coron-dask against pyKLIP (`python -m benchmarks.versus_pyklip`)",
        "",
        f"RDI in zones ({zones}), KL modes {','.join(map(str, NUMBASIS))}, on this machine "
        f"({rows[0]['cpus']} CPUs). coron-dask: the whole run (outlier_detection, stack, "
        "alignment, KLIP; no resample); pyKLIP: `klip_dataset` on the frames coron-dask's "
        "KLIP subtracted from, its own process pool. Peak memory: the process tree's.",
        "",
        "| scenario | frames | science × references | coron-dask whole run | its KLIP (task s) "
        "| peak | pyKLIP klip_dataset | peak | psfsub difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['size']}² | 2 × {r['sci_ints']} × {r['references']} | "
            f"{r['coron_dask_seconds']} s | {r['coron_dask_klip_task_seconds']} | "
            f"{r['coron_dask_peak_gib']} GiB | {r['pyklip_klip_seconds']} s | "
            f"{r['pyklip_peak_gib']} GiB | {r['psfsub_relative_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS))
    parser.add_argument("--work", type=Path, help="where to simulate and run (default: a temp)")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="versus-pyklip-", dir=args.work))
    try:
        rows = [run_scenario(name, root) for name in args.scenario or list(SCENARIOS)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "versus-pyklip.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / "versus-pyklip.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
