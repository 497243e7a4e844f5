"""Companions recovered by the exact RDI forward model (or, ``--mode ADI+RDI``, negative
injection with the bases rebuilt) and emcee: bias, coverage of the 68 % intervals and
accuracy, over many simulated observations, on this machine.

    /work/main/.venv/bin/python -m benchmarks.companions --seeds 10 --workdir /tmp/companions
    /work/main/.venv/bin/python -m benchmarks.companions --tables   # companions.md from the JSON
    /work/main/.venv/bin/python -m benchmarks.companions --mode ADI+RDI --seeds 2  # -adi+rdi

Each case is a simulated observation (``science.simulate``: 128², two rolls 10° apart,
2 × 4 science integrations, 5 × 3 reference frames; a seed of its own: its noise and
position angle are no other case's) with one companion at a
separation of ``SEPARATIONS`` (λ/D = 2 px) and a position angle drawn from the seed, at a
contrast that makes it about ``SIGNIFICANCES`` σ (from a calibration run per separation:
the contrast's posterior width at a faint companion, the noise not depending on the
companion). It is reduced (RDI, ``REDUCTION``) and fitted (``pipeline.companions``) from
a start 0.5 px off the truth, one companion per run. The truth is the simulation's, in the
fit's convention: the off-axis PSF's centroid (``read_offaxis_psf`` centres the box on
it; the simulation places the optical axis), its detector offset seen on the sky through
each roll's WCS, averaged over the rolls (``tests.test_companions.centroid_truth``).

Recorded per case: the truth, the medians and 68 % intervals, bias / σ (σ half the
interval), whether the interval holds the truth, the position error in λ/D, S/N, τ, the
acceptance fraction, the chain's length and the time of the fit (the reduction apart).
Summary: mean and rms of bias / σ per parameter, coverage (60–76 % is a 68 % interval's
binomial range for ~100 cases), the 10σ companions' position error.
"""

import argparse
import json
import logging
import shutil
import time
from itertools import product
from pathlib import Path

import numpy as np

from coron_dask.pipeline.companions import Guess, measure_companions
from coron_dask.science.simulate import simulate, truth_places

RESULTS = Path(__file__).parent / "results"
OBSERVATION = {"size": 128, "sci_exps": 2, "sci_ints": 4, "psf_exps": 5, "psf_ints": 3}
REDUCTION = {"truncate": 10, "annuli": 5, "iwa": 4.0, "transmission": "none"}
SEPARATIONS = (8.0, 14.0)  # λ/D
SIGNIFICANCES = (5.0, 10.0, 30.0, 50.0)
LAMBDA_D = 2.0  # pixels
SCALE = 0.063  # arcsec a pixel
PARAMETERS = ("separation", "position_angle", "contrast")
CALIBRATION = 5e-6


def run_case(
    folder: Path, seed: int, separation: float, contrast: float, reduction: dict = REDUCTION
) -> dict:
    """Simulate (its noise and position angle from ``seed``), reduce and fit one
    companion: the case's record."""
    from tests.test_companions import centroid_truth

    rng = np.random.default_rng(1000 + seed)
    angle = rng.uniform(0, 2 * np.pi)
    radius = separation * LAMBDA_D
    offset = (radius * np.cos(angle), radius * np.sin(angle))
    asn = simulate(folder / "sim", seed=seed, contrast=contrast, companion=offset, **OBSERVATION)
    truth = json.loads((folder / "sim" / "truth.json").read_text())
    star, place = truth_places(truth)
    miss = rng.normal(0, 0.5 / np.sqrt(2), 2)  # px
    start = (
        star.separation(place).arcsec + miss[0] * SCALE,
        star.position_angle(place).deg + np.degrees(miss[1] / radius),
    )
    began = time.perf_counter()
    fits_found, _ = measure_companions(
        asn,
        folder / "out",
        offaxis_psf=folder / "sim" / "offaxis_psf.fits",
        guesses=[Guess(*start)],
        psfmask=folder / "sim" / "psfmask.fits",
        execution={"scheduler": "synchronous", "progress": False},
        **reduction,
    )
    total = time.perf_counter() - began
    fit = fits_found[0]
    true = (*centroid_truth(folder / "sim", truth, fit), contrast)
    record = {"seed": seed, "separation_lambda_d": separation, "snr": fit.snr}
    for name, value in zip(PARAMETERS, true, strict=True):
        estimate = getattr(fit, name)
        error = estimate.median - value
        if name == "position_angle":
            error = (error + 180) % 360 - 180
        record[name] = {
            "truth": value,
            "median": estimate.median,
            "minus": estimate.minus,
            "plus": estimate.plus,
            "bias_sigma": error / estimate.sigma,
            "covered": bool(-estimate.plus <= error <= estimate.minus),
        }
    along = (fit.separation.median - true[0]) / SCALE
    across = np.radians(record["position_angle"]["median"] - true[1]) * true[0] / SCALE
    record["position_error_lambda_d"] = float(np.hypot(along, across) / LAMBDA_D)
    record.update(
        tau=[float(t) for t in fit.tau],
        acceptance=fit.acceptance,
        steps=fit.steps,
        converged=fit.converged,
        at_edge=fit.at_edge,
        fit_seconds=fit.seconds,
        run_seconds=total - fit.seconds,
        correlation=fit.correlation.tolist(),
    )
    return record


def calibrate(workdir: Path, reduction: dict = REDUCTION) -> dict[float, float]:
    """Per separation: the contrast's posterior σ for a faint companion (seed 0)."""
    out = {}
    for separation in SEPARATIONS:
        folder = workdir / f"calibration-{separation:g}"
        record = run_case(folder, 0, separation, CALIBRATION, reduction)
        shutil.rmtree(folder)
        c = record["contrast"]
        out[separation] = 0.5 * (c["minus"] + c["plus"])
    return out


def _statistics(records: list[dict]) -> dict:
    """Bias / σ (mean, rms) and coverage of each parameter over ``records``."""
    out = {"cases": len(records)}
    for name in PARAMETERS:
        ratios = np.array([r[name]["bias_sigma"] for r in records])
        covered = np.array([r[name]["covered"] for r in records])
        out[name] = {
            "bias_sigma_mean": float(ratios.mean()),
            "bias_sigma_rms": float(np.sqrt(np.mean(ratios**2))),
            "coverage": float(covered.mean()),
        }
    return out


def summary(records: list[dict]) -> dict:
    """The statistics over every case and per significance; position errors at 10σ."""
    out = _statistics(records)
    out["by_significance"] = {
        str(target): _statistics([r for r in records if r["target"] == target])
        for target in sorted({r["target"] for r in records})
    }
    ten = [r["position_error_lambda_d"] for r in records if r["target"] == 10.0]
    out["position_error_10sigma_lambda_d"] = {
        "median": float(np.median(ten)) if ten else None,
        "max": float(np.max(ten)) if ten else None,
    }
    out["fit_seconds_median"] = float(np.median([r["fit_seconds"] for r in records]))
    out["converged"] = float(np.mean([r["converged"] for r in records]))
    out["at_edge"] = int(sum(r.get("at_edge", False) for r in records))
    return out


def tables(data: dict) -> str:
    """companions.md: the summary and the cases."""
    s = data["summary"]
    lines = [
        f"# Companions: injection and recovery, {data.get('mode', 'RDI')} "
        "(benchmarks/companions.py)",
        "",
        f"{s['cases']} cases: seeds × separations {SEPARATIONS} λ/D × about "
        f"{SIGNIFICANCES} σ; calibration (contrast σ per separation): {data['calibration']}.",
        "",
        "| parameter | bias/σ mean | bias/σ rms | 68 % coverage |",
        "|---|---|---|---|",
    ]
    for label, part in [("all", s), *((f"{t}σ", v) for t, v in s["by_significance"].items())]:
        for name in PARAMETERS:
            p = part[name]
            lines.append(
                f"| {name} ({label}, {part['cases']}) | {p['bias_sigma_mean']:+.2f} | "
                f"{p['bias_sigma_rms']:.2f} | {100 * p['coverage']:.0f} % |"
            )
    ten = s["position_error_10sigma_lambda_d"]
    lines += [
        "",
        f"10σ companions located to {ten['median']:.3f} λ/D (median), {ten['max']:.3f} λ/D "
        f"at most; fit time {s['fit_seconds_median']:.1f} s (median); chains converged: "
        f"{100 * s['converged']:.0f} %; maximum at the window's edge: {s['at_edge']} case(s).",
        "",
        "| seed | sep (λ/D) | target σ | S/N | sep bias/σ | PA bias/σ | contrast bias/σ | "
        "error (λ/D) | τ | acceptance | steps | fit (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        lines.append(
            f"| {r['seed']} | {r['separation_lambda_d']:g} | {r['target']:g} | {r['snr']:.1f} | "
            + " | ".join(f"{r[name]['bias_sigma']:+.2f}" for name in PARAMETERS)
            + f" | {r['position_error_lambda_d']:.3f} | {max(r['tau']):.0f} | "
            f"{r['acceptance']:.2f} | {r['steps']} | {r['fit_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/companions-benchmark"))
    parser.add_argument("--tables", action="store_true", help="companions.md from the JSON")
    parser.add_argument("--mode", choices=("RDI", "ADI+RDI"), default="RDI")
    parser.add_argument(
        "--align-to", choices=("each", "first"), default=None, help="default: each for RDI, "
        "first for ADI+RDI (one basis per roll: the sampler's cost is per basis)"
    )  # fmt: skip
    args = parser.parse_args()
    stem = "companions" if args.mode == "RDI" else f"companions-{args.mode.lower()}"
    path, table = RESULTS / f"{stem}.json", RESULTS / f"{stem}.md"
    if args.tables:
        table.write_text(tables(json.loads(path.read_text())))
        return
    reduction = dict(REDUCTION, mode=args.mode)
    align_to = args.align_to or ("each" if args.mode == "RDI" else "first")
    reduction["align_to"] = align_to
    logging.basicConfig(level=logging.WARNING)
    args.workdir.mkdir(parents=True, exist_ok=True)
    calibration = calibrate(args.workdir, reduction)
    records = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for i, (separation, target) in enumerate(product(SEPARATIONS, SIGNIFICANCES)):
            own = 100 * seed + i  # every case its own noise and position angle
            folder = args.workdir / f"case-{own}"
            record = run_case(folder, own, separation, target * calibration[separation], reduction)
            record["target"] = target
            shutil.rmtree(folder)
            records.append(record)
            print(json.dumps({k: record[k] for k in ("seed", "target", "snr")}), flush=True)
            data = {
                "mode": args.mode,
                "align_to": align_to,
                "calibration": calibration,
                "cases": records,
                "summary": summary(records),
            }
            path.write_text(json.dumps(data, indent=1))
    table.write_text(tables(data))


if __name__ == "__main__":
    main()
