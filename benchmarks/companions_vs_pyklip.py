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

``--mode ADI+RDI`` (results in companions-vs-pyklip-adi+rdi.json/md): the same companion in
two science exposures (two rolls 10° apart, ``ADI_SIZES``: the test's 128² and 256² with
more integrations and references), fitted over both rolls by coron-dask
(``measure_companions(mode="ADI+RDI", align_to="first")``: negative injection, the bases
rebuilt) and by pyKLIP's KLIP-FM in ADI+RDI (``tests.pyklip_fm_adi``) then FMAstrometry.

    /work/main/.venv/bin/python -m benchmarks.companions_vs_pyklip --mode ADI+RDI \
        --size 128 --seeds 1 --workdir /tmp/cvp
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
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
#: ADI+RDI: two rolls; the test's size, and 256² with twice the integrations and 3× the
#: references (the eigendecompositions our sampler redoes per step grow with them)
ADI_SIZES = {
    128: {"size": 128, "sci_exps": 2, "sci_ints": 4, "psf_exps": 5, "psf_ints": 3},
    256: {"size": 256, "sci_exps": 2, "sci_ints": 8, "psf_exps": 9, "psf_ints": 5},
}


def one_tool(tool: str, folder: Path, seed: int, size: int | None = None) -> None:
    """Run one tool on the case of ``seed`` in ``folder`` (simulated by the "ours" run) and
    write its figures to ``folder``/<tool>.json; ``size``: ADI+RDI at that ``ADI_SIZES``."""
    from tests.pyklip_fm import REDUCTION, estimates, our_fit, simulated, their_fit

    adi = {**REDUCTION, "mode": "ADI+RDI"} if size else None
    if tool == "ours":
        began = time.perf_counter()
        if adi:
            asn, start = _simulated_rolls(folder, seed, ADI_SIZES[size])
        else:
            asn, _, start = simulated(folder, CONTRAST, OFFSET, seed)
        simulate_seconds = time.perf_counter() - began
        fit = _our_fit_adi(folder, asn, start, adi) if adi else our_fit(folder, asn, start)
        record = {
            "simulate_seconds": simulate_seconds,
            "estimates": estimates(fit),
            "fit_seconds": fit.seconds,
            "converged": fit.converged,
            "snr": fit.snr,
            "steps": fit.steps,
            "method": fit.method,
        }
    else:
        from astropy.coordinates import SkyCoord

        saved = json.loads((folder / "case.json").read_text())
        star = SkyCoord(*saved["star"], unit="deg")
        asn, start = Path(saved["asn"]), tuple(saved["start"])
        if adi:
            from tests.pyklip_fm_adi import their_fit_adi

            theirs, reduce_seconds = their_fit_adi(
                folder, asn, star, start, CONTRAST, seed, MCMC, adi
            )
        else:
            theirs, reduce_seconds = their_fit(folder, asn, star, start, CONTRAST, seed, MCMC)
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


def _simulated_rolls(folder: Path, seed: int, observation: dict) -> tuple[Path, tuple]:
    """The companion (``OFFSET`` at the first roll, ``CONTRAST``) in two rolls: the ASN and
    the fits' start, 0.02" and 1° off the truth."""
    from coron_dask.science.simulate import simulate, truth_places

    asn = simulate(folder / "sim", contrast=CONTRAST, companion=OFFSET, seed=seed, **observation)
    star, place = truth_places(json.loads((folder / "sim" / "truth.json").read_text()))
    return asn, (star.separation(place).arcsec + 0.02, star.position_angle(place).deg + 1.0)


def _our_fit_adi(folder: Path, asn: Path, start: tuple, reduction: dict):
    """coron-dask's ADI+RDI fit (``measure_companions``, the reduction included)."""
    from coron_dask.pipeline.companions import Guess, measure_companions

    fits_found, _ = measure_companions(
        asn,
        folder / "ours",
        offaxis_psf=folder / "sim" / "offaxis_psf.fits",
        guesses=[Guess(*start)],
        psfmask=folder / "sim" / "psfmask.fits",
        transmission="none",
        execution={"scheduler": "synchronous", "progress": False},
        **reduction,
    )
    return fits_found[0]


def _star(folder: Path) -> tuple[float, float]:
    return tuple(json.loads((folder / "sim" / "truth.json").read_text())["star_sky"])


def run_case(workdir: Path, seed: int, size: int | None = None, resume: bool = False) -> dict:
    """Both tools on the case of ``seed`` (``size``: ADI+RDI at that size), each in its own
    measured process; ``resume``: a tool measured before in ``workdir`` is not run again."""
    folder = workdir / (f"adi{size}-seed{seed}" if size else f"seed{seed}")
    if not resume:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"seed": seed, **({"mode": "ADI+RDI", **ADI_SIZES[size]} if size else {})}
    for tool in ("ours", "pyklip"):
        measured_path = folder / f"{tool}-measured.json"
        if resume and measured_path.exists():
            record[tool] = json.loads(measured_path.read_text())
            continue
        for made in ("reduced", "pyklip") if tool == "pyklip" else ():
            shutil.rmtree(folder / made, ignore_errors=True)
        load = os.getloadavg()
        command = [sys.executable, "-m", "benchmarks.companions_vs_pyklip"]
        command += ["--tool", tool, "--seed", str(seed), "--workdir", str(workdir)]
        command += ["--mode", "ADI+RDI", "--size", str(size)] if size else []
        with open(folder / f"{tool}.log", "w") as log:
            measured = measure(command, stdout=log, stderr=subprocess.STDOUT)
        if measured.returncode:
            raise SystemExit(f"{tool} failed on seed {seed}: see {folder / f'{tool}.log'}")
        record[tool] = {
            **json.loads((folder / f"{tool}.json").read_text()),
            "wall_seconds": measured.seconds,
            "peak_memory_gib": measured.peak_memory / 2**30,
            "load_before": load,
            "load_after": os.getloadavg(),
        }
        measured_path.write_text(json.dumps(record[tool]))
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


def adi_tables(rows: list[dict]) -> str:
    """The ADI+RDI cases as a Markdown page."""
    lines = [
        "# Companions in ADI+RDI: coron-dask against pyKLIP's KLIP-FM + FMAstrometry",
        "",
        f"`python -m benchmarks.companions_vs_pyklip --mode ADI+RDI`. Machine: {os.cpu_count()} "
        f"cores, **shared** (its 1-minute load before → after each tool); pyKLIP's MCMC: {MCMC}. "
        "Ours: the fit (negative injection, the bases rebuilt; emcee until 50 τ) and the whole "
        "command less the simulation (reduction + fit); pyKLIP: `fm.klip_dataset` (ADI+RDI, "
        "one thread) + `FMAstrometry`, and its whole process less the simulation-free "
        "reduction that gave it coron-dask's frames. Δ/σ: ours − pyKLIP over both 68 % half "
        "widths in quadrature.",
        "",
        "| size | frames: 2 rolls × ints, refs | seed | sep ours (″) | sep pyKLIP | PA ours (°) "
        "| PA pyKLIP | contrast ours | contrast pyKLIP | Δ/σ sep, PA, contrast "
        "| ours: fit / command s (steps) | peak GiB | pyKLIP: FM + MCMC / process s "
        "| peak GiB | load ours, pyKLIP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, t = r["ours"], r["pyklip"]
        cells = [f"{r['size']}²", f"2 × {r['sci_ints']}, {r['psf_exps'] * r['psf_ints']}"]
        cells.append(str(r["seed"]))
        for name, form in (("separation", ".4f"), ("position_angle", ".2f"), ("contrast", ".3g")):
            for est in (o["estimates"][name], t["estimates"][name]):
                cells.append(f"{est[0]:{form}} ± {est[1]:{form}}")
        cells.append(", ".join(f"{v:+.2f}" for v in r["agreement_sigma"].values()))
        command = o["wall_seconds"] - o["simulate_seconds"]
        cells.append(f"{o['fit_seconds']:.1f} / {command:.1f} ({o['steps']})")
        cells.append(f"{o['peak_memory_gib']:.2f}")
        process = t["wall_seconds"] - t["reduce_seconds"]
        cells.append(f"{t['fm_seconds']:.1f} + {t['mcmc_seconds']:.1f} / {process:.1f}")
        cells.append(f"{t['peak_memory_gib']:.2f}")
        cells.append(
            ", ".join(f"{x['load_before'][0]:.1f} → {x['load_after'][0]:.1f}" for x in (o, t))
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_adi(row: dict) -> str:
    """Write ``row`` with the saved ADI+RDI rows of other sizes and seeds: the table."""
    path = RESULTS / "companions-vs-pyklip-adi+rdi.json"
    saved = json.loads(path.read_text()) if path.exists() else []
    rows = [r for r in saved if (r["size"], r["seed"]) != (row["size"], row["seed"])] + [row]
    rows.sort(key=lambda r: (r["size"], r["seed"]))
    path.write_text(json.dumps(rows, indent=1))
    table = adi_tables(rows)
    path.with_suffix(".md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--mode", choices=("RDI", "ADI+RDI"), default="RDI")
    parser.add_argument(
        "--size", type=int, action="append", choices=list(ADI_SIZES), help="ADI+RDI: default all"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep a tool's figures measured in --workdir"
    )
    parser.add_argument("--tool", choices=("ours", "pyklip"))
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    adi = args.mode == "ADI+RDI"
    if args.tool:
        size = args.size[0] if adi else None
        name = f"adi{size}-seed{args.seed}" if adi else f"seed{args.seed}"
        one_tool(args.tool, args.workdir / name, args.seed, size)
        return
    if adi:
        for size in args.size or list(ADI_SIZES):
            for i in range(args.seeds):
                table = save_adi(run_case(args.workdir, 11 + i, size, args.resume))
        print(table)
        return
    cases = [run_case(args.workdir, 11 + i) for i in range(args.seeds)]
    data = {"cpus": os.cpu_count(), "mcmc": MCMC, "cases": cases}
    RESULTS.joinpath("companions-vs-pyklip.json").write_text(json.dumps(data, indent=1))
    RESULTS.joinpath("companions-vs-pyklip.md").write_text(tables(data))
    print(tables(data))


if __name__ == "__main__":
    main()
