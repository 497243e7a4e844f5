"""Time per companion: coron-dask's fit (the exact RDI forward model, emcee until 50 τ)
against pyKLIP's ``fm.klip_dataset`` (``FMPlanetPSF``) and ``fitpsf.FMAstrometry`` on the
same data, on this machine, and how the two agree.

    /work/main/.venv/bin/python -m benchmarks.companions_vs_pyklip --seeds 3 --workdir /tmp/cvp

Each case is ``tests.pyklip_fm``'s: one science exposure (128², 4 integrations, one roll),
5 × 3 reference frames, one companion at 8 λ/D of contrast 5e-6 (about 13σ), a seed of
its own; both start 0.02" and 1° off the truth. Each tool runs in a process of its own
(``monitor.measure``: its wall time and peak memory, the machine's load before it):
coron-dask's ``measure_companions`` (the reduction and the fit; the fit's own seconds
recorded apart), pyKLIP's KLIP-FM and MCMC (the reduction that gives it the same frames
timed apart, and not counted). pyKLIP's chain has the fixed length ``MCMC`` gives; ours
runs until it is 50 autocorrelation times long.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.monitor import measure

RESULTS = Path(__file__).parent / "results"
CONTRAST, OFFSET = 5e-6, (14.0, 9.0)
MCMC = {
    "nwalkers": 50,
    "nburn": 100,
    "nsteps": 200,
    "fitboxsize": 13,
    "dr": 4,
    "exclusion_radius": 8,
    "length": 3.0,
}


def one_tool(tool: str, folder: Path, seed: int) -> None:
    """Run one tool on the case of ``seed`` in ``folder`` (simulated by the "ours" run) and
    write its figures to ``folder``/<tool>.json."""
    from tests.pyklip_fm import estimates, our_fit, simulated, their_fit

    if tool == "ours":
        asn, _, start = simulated(folder, CONTRAST, OFFSET, seed)
        fit = our_fit(folder, asn, start)
        record = {
            "estimates": estimates(fit),
            "fit_seconds": fit.seconds,
            "converged": fit.converged,
            "snr": fit.snr,
            "steps": fit.steps,
        }
    else:
        from astropy.coordinates import SkyCoord

        saved = json.loads((folder / "case.json").read_text())
        star = SkyCoord(*saved["star"], unit="deg")
        asn = Path(saved["asn"])
        theirs, reduce_seconds = their_fit(
            folder, asn, star, tuple(saved["start"]), CONTRAST, seed, MCMC
        )
        record = {
            "estimates": {
                name: getattr(theirs, name) for name in ("separation", "position_angle", "contrast")
            },
            "fm_seconds": theirs.fm_seconds,
            "mcmc_seconds": theirs.mcmc_seconds,
            "reduce_seconds": reduce_seconds,
        }
    if tool == "ours":
        folder.joinpath("case.json").write_text(
            json.dumps({"asn": str(asn), "star": [float(v) for v in _star(folder)], "start": start})
        )
    (folder / f"{tool}.json").write_text(json.dumps(record))


def _star(folder: Path) -> tuple[float, float]:
    return tuple(json.loads((folder / "sim" / "truth.json").read_text())["star_sky"])


def run_case(workdir: Path, seed: int) -> dict:
    """Both tools on the case of ``seed``, each in its own measured process."""
    folder = workdir / f"seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    record = {"seed": seed}
    for tool in ("ours", "pyklip"):
        load = os.getloadavg()
        command = [sys.executable, "-m", "benchmarks.companions_vs_pyklip"]
        command += ["--tool", tool, "--seed", str(seed), "--workdir", str(workdir)]
        with open(folder / f"{tool}.log", "w") as log:
            measured = measure(command, stdout=log, stderr=subprocess.STDOUT)
        if measured.returncode:
            raise SystemExit(f"{tool} failed on seed {seed}: see {folder / f'{tool}.log'}")
        record[tool] = {
            **json.loads((folder / f"{tool}.json").read_text()),
            "wall_seconds": measured.seconds,
            "peak_memory_gib": measured.peak_memory / 2**30,
            "load_before": load,
        }
    from tests.pyklip_fm import PyklipFit, agreement

    theirs = PyklipFit(**record["pyklip"]["estimates"], fm_seconds=0.0, mcmc_seconds=0.0)
    ratios = agreement(record["ours"]["estimates"], theirs)
    record["agreement_sigma"] = {name: value[-1] for name, value in ratios.items()}
    return record


def tables(data: dict) -> str:
    """The cases as a Markdown page."""
    lines = [
        "# Companions: coron-dask against pyKLIP's KLIP-FM + FMAstrometry",
        "",
        f"Machine: {data['cpus']} cores; pyKLIP's MCMC: {data['mcmc']}.",
        "",
        "| seed | sep ours (″) | sep pyKLIP | PA ours (°) | PA pyKLIP | contrast ours "
        "| contrast pyKLIP | Δ/σ sep, PA, contrast | ours: fit / wall s, peak GiB "
        "| pyKLIP: FM + MCMC / wall s, peak GiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        o, t = r["ours"], r["pyklip"]
        cells = [str(r["seed"])]
        for name, form in (("separation", ".4f"), ("position_angle", ".2f"), ("contrast", ".3g")):
            for est in (o["estimates"][name], t["estimates"][name]):
                cells.append(f"{est[0]:{form}} ± {est[1]:{form}}")
        cells.append(", ".join(f"{v:+.2f}" for v in r["agreement_sigma"].values()))
        cells.append(
            f"{o['fit_seconds']:.1f} / {o['wall_seconds']:.1f}, {o['peak_memory_gib']:.2f}"
        )
        cells.append(
            f"{t['fm_seconds'] + t['mcmc_seconds']:.1f} / {t['wall_seconds']:.1f}, "
            f"{t['peak_memory_gib']:.2f}"
        )
        cells.append(f"{o['load_before'][0]:.1f}, {t['load_before'][0]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    ratios = np.array([list(r["agreement_sigma"].values()) for r in data["cases"]])
    lines += [
        "",
        "Largest |Δ|/σ (σ: both 68 % half widths in quadrature) per parameter: "
        + ", ".join(f"{v:.2f}" for v in np.abs(ratios).max(axis=0)),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--tool", choices=("ours", "pyklip"))
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    if args.tool:
        one_tool(args.tool, args.workdir / f"seed{args.seed}", args.seed)
        return
    cases = [run_case(args.workdir, 11 + i) for i in range(args.seeds)]
    data = {"cpus": os.cpu_count(), "mcmc": MCMC, "cases": cases}
    RESULTS.joinpath("companions-vs-pyklip.json").write_text(json.dumps(data, indent=1))
    RESULTS.joinpath("companions-vs-pyklip.md").write_text(tables(data))
    print(tables(data))


if __name__ == "__main__":
    main()
