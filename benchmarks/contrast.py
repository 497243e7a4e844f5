"""The contrast curve's cost: ``coron-dask contrast`` against the science reduction alone
(``coron-dask run``) and against VIP doing the same injection-recovery, on this machine.

    /work/main/.venv/bin/python -m benchmarks.contrast --workdir /work/bench/contrast
    /work/main/.venv/bin/python -m benchmarks.contrast --dataset demo --repeats 1
    /work/main/.venv/bin/python -m benchmarks.contrast --tables   # contrast.md from the JSON

Each dataset is simulated once (``coron-dask simulate``, seed 1; kept in the workdir for
later runs): ``demo`` is what ``coron-dask demo`` reduces (128², 2 × 8 science, 9 × 5
references), ``large`` 320², 2 × 40 science, 9 × 20 references (a few minutes a run). On
each, as whole processes measured by ``benchmarks.monitor`` (wall time, the peak of the
summed PSS of the process and all its children), one after the other and each only once
other processes use less than 0.3 of a core (``wait_for_quiet``: others' tests on these 2
cores would be measured too), ``--repeats`` times (medians reported; demo 5, large 2):

- ``coron-dask run`` (the science reduction alone, psfalign written as by default), and
  ``coron-dask run --no-psfalign`` (the same graph as the contrast run's science: a
  contrast run writes no psfalign);
- ``coron-dask contrast``: 10 separations × position angles 0, 120, 240 (one injected set
  per angle), the same KL truncation (``TRUNCATE``) and cluster (``CLUSTER``) as the runs;
- VIP: ``vip_hci.metrics.contrast_curve`` with ``vip_hci.psfsub.pca`` in RDI mode
  (``cube_ref`` the reference integrations) on the same calints, in one process
  (``python -m benchmarks.contrast vip ...``), ``nproc`` 2 (this machine's cores), its
  loading, NaN filling and centring included. The calints are read with astropy; each
  frame's NaNs are filled with the median of its finite 3 × 3 neighbours (coron-dask's
  median box); every frame is shifted (VIP's FFT shift) to put the star, at its WCS
  position of TARG_RA/TARG_DEC, on VIP's frame centre; the angles are ROLL_REF (with them
  the derotated frame is north up, east left: the simulated companion lands on its sky
  position); the off-axis PSF is ``offaxis_psf.fits``; fwhm is λ/D at F410M's pivot (2.06
  px at 63 mas); ``starphot`` is the off-axis PSF's flux in VIP's 1 × FWHM aperture (from
  VIP's own ``normalize_psf``, as its throughput normalises the template: VIP's noise and
  throughput are sums in that aperture, so only that flux makes the ratio a contrast; the
  PSF's total flux would lower VIP's curve by the factor ``starphot / total`` recorded);
  nbranch 3 (theta 90: position angles 0, 120, 240), fc_rad_sep 3 (VIP's smallest: 3
  patterns per branch), ncomp = ``TRUNCATE``, scaling ``spat-mean`` (KLIP's per-frame mean
  subtraction), collapse ``mean`` (the i2d is a weighted mean), smooth False (its
  Savitzky-Golay window, 2 × fwhm samples, assumes noise sampled every pixel, its default
  noise_sep; over 10 samples λ/D apart or more it smooths across the whole curve, by
  factors up to 40 on the large set), its other options default.

The separations. VIP injects at every radius of its own grid, fwhm + i × noise_sep from the
frame's centre, and has no list of separations; so ``separation_grid`` picks noise_sep such
that that grid has exactly 10 radii past its first (inner_rad 2 drops the first, at 1 λ/D,
under the occulting spot), and coron-dask is given the same 10 (``--separations``, in
arcsec): both inject at the same radii. Each side's curve is its own (5σ, Student-t
corrected: VIP's ``sensitivity_student``); side by side at the 10 separations, coron-dask's
(sampled every λ/D / 2) interpolated in log contrast, VIP's at its grid's radii.

Why the curves differ (recorded, not forced to agree). The throughputs agree (both ≈ 1 but
nearest the star: RDI). VIP's noise is the standard deviation of the sums in apertures of
diameter λ/D on the ring and its contrast that over the star's flux in the same aperture;
coron-dask's is the standard deviation of the ring's pixels (annulus λ/D wide) over the
star's peak. The ratio of the two (``noise_estimators``, from the off-axis PSF alone) is
√N × peak / aperture flux for white pixel noise (N the aperture's pixels: 0.79 here) and
N × peak / aperture flux for noise correlated over the aperture (speckles: 1.44). The
final images differ too: VIP's is the mean of the derotated residuals on the detector's
grid, coron-dask's the drizzled i2d. And coron-dask masks sources above 5σ (the
simulated companion, contrast 4e-6 at 1.05") out of its noise, VIP does not.

Results: benchmarks/results/contrast.json and contrast.md (merged with earlier results of
datasets not run now).

Peers: VIP-HCI 2.1.1 (``/work/main/.venv/bin/pip install vip-hci==2.1.1``; it brings
scikit-learn, pandas, hciplot); not in pyproject: only this benchmark uses it.
"""

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from benchmarks.monitor import measure
from benchmarks.run import commit

RESULTS = Path(__file__).parent / "results"
GIB = 2**30
TRUNCATE = 20
POSITION_ANGLES = (0.0, 120.0, 240.0)
COUNT = 10  # separations
CLUSTER = ["--n-workers", "2", "--memory-limit", "2GiB", "--no-progress"]
NPROC = 2  # VIP's processes: this machine's cores
SIGMA = 5


@dataclass(frozen=True)
class Dataset:
    name: str
    size: int
    sci_exps: int
    sci_ints: int
    psf_exps: int
    psf_ints: int
    repeats: int = 1  # default number of measurements of each command
    seed: int = 1


DATASETS = {
    "demo": Dataset("demo", 128, 2, 8, 9, 5, repeats=5),
    "large": Dataset("large", 320, 2, 40, 9, 20, repeats=2),
}


# ---------------------------------------------------------------- the separations


def separation_grid(height: int, fwhm: float, count: int = COUNT) -> tuple[float, np.ndarray]:
    """VIP's radial grid with ``count`` radii past its first: (noise_sep, radii in pixels).

    VIP's throughput injects at fwhm + i × noise_sep, i < floor((c − fwhm) / noise_sep) − 1
    (c = height // 2, its frame centre's row); (c − fwhm) / (count + 2.5) gives count + 1
    radii, of which inner_rad=2 keeps the last ``count``.
    """
    centre = height // 2
    step = (centre - fwhm) / (count + 2.5)
    annuli = math.floor((centre - fwhm) / step) - 1
    assert annuli == count + 1, annuli
    return step, fwhm + step * np.arange(1, count + 1)


def observation_info(asn: Path) -> dict:
    """Frame size, filter, pixel scale (arcsec), λ/D (pixels) of the first science exposure."""
    from coron_dask.science.geometry import lambda_over_d, pixel_scale_arcsec

    members = json.loads(asn.read_text())["products"][0]["members"]
    first = next(m["expname"] for m in members if m["exptype"] == "science")
    with fits.open(asn.parent / first) as hdul:
        header, shape = hdul["SCI"].header, hdul["SCI"].data.shape
        filter_name = hdul[0].header["FILTER"]
    scale = pixel_scale_arcsec(WCS(header))
    return {
        "shape": list(shape[1:]),
        "filter": filter_name,
        "pixel_scale_arcsec": scale,
        "lambda_over_d_px": lambda_over_d(filter_name, scale / 3600),
    }


# ---------------------------------------------------------------- the peer: VIP


def fill_nans(cube: np.ndarray) -> np.ndarray:
    """Each non-finite pixel replaced by the median of the finite pixels of its 3 × 3 box
    in its own frame (0 where there are none)."""
    bad = ~np.isfinite(cube)
    if not bad.any():
        return cube
    padded = np.pad(cube, ((0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    f, y, x = np.nonzero(bad)
    boxes = np.stack([padded[f, y + dy, x + dx] for dy in range(3) for dx in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN boxes
        values = np.nanmedian(boxes, axis=0)
    out = cube.copy()
    out[f, y, x] = np.nan_to_num(values)
    return out


def load_for_vip(asn: Path, nproc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(science cube, its angles, reference cube), float64, NaNs filled, every frame shifted
    so that its star (the WCS position of TARG_RA, TARG_DEC) is on VIP's frame centre."""
    from vip_hci.preproc import cube_shift

    science, angles, references = [], [], []
    for member in json.loads(asn.read_text())["products"][0]["members"]:
        with fits.open(asn.parent / member["expname"]) as hdul:
            cube = fill_nans(hdul["SCI"].data.astype(np.float64))
            header, primary = hdul["SCI"].header, hdul[0].header
        x, y = WCS(header, naxis=2).world_to_pixel_values(primary["TARG_RA"], primary["TARG_DEC"])
        ny, nx = cube.shape[1:]
        cube = cube_shift(cube, ny // 2 - float(y), nx // 2 - float(x), nproc=nproc)
        if member["exptype"] == "science":
            science.append(cube)
            angles += [float(header["ROLL_REF"])] * len(cube)
        else:
            references.append(cube)
    return np.concatenate(science), np.array(angles), np.concatenate(references)


def vip_main(argv: list[str]) -> None:
    """``python -m benchmarks.contrast vip ASN OUT.json --fwhm --pxscale --noise-sep``: VIP's
    contrast curve of the association, with the time of each phase."""
    parser = argparse.ArgumentParser(prog="benchmarks.contrast vip")
    parser.add_argument("asn", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fwhm", type=float, required=True)
    parser.add_argument("--pxscale", type=float, required=True)
    parser.add_argument("--noise-sep", type=float, required=True)
    parser.add_argument("--ncomp", type=int, default=TRUNCATE)
    parser.add_argument("--nproc", type=int, default=NPROC)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import vip_hci
    from vip_hci.fm import normalize_psf
    from vip_hci.metrics import contrast_curve
    from vip_hci.psfsub import pca

    imported = time.perf_counter()
    science, angles, references = load_for_vip(args.asn, args.nproc)
    psf = fits.getdata(args.asn.parent / "offaxis_psf.fits", "SCI").astype(np.float64)
    size = round(3 * args.fwhm)  # the crop contrast_curve normalises the template on
    size += 1 - size % 2
    _, starphot, _ = normalize_psf(
        psf, fwhm=args.fwhm, size=min(size, psf.shape[0]), full_output=True, verbose=False
    )
    loaded = time.perf_counter()
    table, _, frame_nofc, _ = contrast_curve(
        science,
        angles,
        psf,
        args.fwhm,
        args.pxscale,
        float(starphot),
        pca,
        sigma=SIGMA,
        nbranch=len(POSITION_ANGLES),
        theta=90,
        inner_rad=2,
        fc_rad_sep=3,
        noise_sep=args.noise_sep,
        student=True,
        smooth=False,
        plot=False,
        verbose=False,
        full_output=True,
        cube_ref=references,
        ncomp=args.ncomp,
        scaling="spat-mean",
        collapse="mean",
        imlib="vip-fft",
        nproc=args.nproc,
    )
    done = time.perf_counter()
    fits.writeto(args.out.with_suffix(".fits"), frame_nofc, overwrite=True)
    result = {
        "vip_hci": vip_hci.__version__,
        "phases_seconds": {
            "import": imported - start,
            "load_fill_centre": loaded - imported,
            "contrast_curve": done - loaded,
        },
        "frames": {"science": len(science), "references": len(references)},
        "starphot": float(starphot),
        "psf_total_flux": float(psf.sum()),
        "options": {
            "fwhm": args.fwhm,
            "pxscale": args.pxscale,
            "noise_sep": args.noise_sep,
            "sigma": SIGMA,
            "smooth": False,
            "nbranch": len(POSITION_ANGLES),
            "theta": 90,
            "inner_rad": 2,
            "fc_rad_sep": 3,
            "ncomp": args.ncomp,
            "scaling": "spat-mean",
            "collapse": "mean",
            "imlib": "vip-fft",
            "nproc": args.nproc,
        },
        "curve": {column: [float(v) for v in table[column]] for column in table.columns},
    }
    args.out.write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------- measurements


def simulate(dataset: Dataset, folder: Path) -> Path:
    """The dataset's calints (made once: the simulation is seeded), its ASN."""
    done = folder / "dataset.json"
    made = {k: v for k, v in asdict(dataset).items() if k != "repeats"}
    if done.exists() and json.loads(done.read_text()) == made:
        return next(folder.glob("*_asn.json"))
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "coron_dask.cli", "simulate", str(folder)]
    command += ["--size", str(dataset.size), "--seed", str(dataset.seed)]
    command += ["--sci-exps", str(dataset.sci_exps), "--sci-ints", str(dataset.sci_ints)]
    command += ["--psf-exps", str(dataset.psf_exps), "--psf-ints", str(dataset.psf_ints)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    done.write_text(json.dumps(made))
    return next(folder.glob("*_asn.json"))


def others_busy(interval: float = 1.0) -> float:
    """Cores used by the processes outside this benchmark over ``interval`` seconds."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    processes = [p for p in psutil.process_iter() if p.pid not in mine]
    for process in processes:
        try:
            process.cpu_percent(None)
        except psutil.Error:
            continue
    time.sleep(interval)
    used = 0.0
    for process in processes:
        try:
            used += process.cpu_percent(None)
        except psutil.Error:
            continue
    return used / 100


def wait_for_quiet(limit: float = 0.3, patience: float = 1800) -> float:
    """Wait (up to ``patience`` seconds) until other processes use less than ``limit`` of
    a core, as two measurements at once on 2 cores measure neither; what they used."""
    waited = time.perf_counter()
    while (busy := others_busy()) >= limit and time.perf_counter() - waited < patience:
        print(f"waiting: other processes use {busy:.1f} cores", flush=True)
        time.sleep(20)
    return busy


def measured(command: list[str], folder: Path) -> dict:
    """Run ``command`` (its stderr to folder/stderr.log) and what monitor measured of it."""
    log = folder / "stderr.log"
    others = wait_for_quiet()
    with open(log, "w") as stderr:
        result = measure(command, stdout=subprocess.DEVNULL, stderr=stderr)
    if result.returncode:
        raise RuntimeError(f"{command[:5]} failed: {log.read_text()[-3000:]}")
    plan = next((line for line in log.read_text().splitlines() if "block plan:" in line), "")
    return {
        "seconds": result.seconds,
        "peak_memory": result.peak_memory,
        "peak_worker": result.peak_worker,
        "read_bytes": result.read_bytes,
        "write_bytes": result.write_bytes,
        "plan": plan.split(" - ")[-1],
        "others_cores_before": others,
    }


def coron_dask(subcommand: str, asn: Path, out: Path, *extra: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "coron_dask.cli", subcommand, str(asn), "-o", str(out)]
    command += ["--psfmask", str(asn.parent / "psfmask.fits"), "--truncate", str(TRUNCATE)]
    return measured([*command, *CLUSTER, *extra], out)


def vip(asn: Path, out: Path, info: dict, noise_sep: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "benchmarks.contrast", "vip", str(asn), str(out / "vip.json")]
    command += ["--fwhm", str(info["lambda_over_d_px"])]
    command += ["--pxscale", str(info["pixel_scale_arcsec"]), "--noise-sep", str(noise_sep)]
    command += ["--ncomp", str(TRUNCATE), "--nproc", str(NPROC)]
    return {**measured(command, out), **json.loads((out / "vip.json").read_text())}


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


# ---------------------------------------------------------------- the curves


def coron_dask_curve(out: Path) -> dict:
    """The contrast run's curve (ECSV) and its measured throughput at each injected
    separation (the mean over position angles)."""
    from astropy.table import Table

    table = Table.read(next(out.glob("*_contrast.ecsv")), format="ascii.ecsv")
    injections = table.meta["injections"]
    injected = sorted({row["separation"] for row in injections})
    throughput = [
        float(np.mean([row["throughput"][0] for row in injections if row["separation"] == s]))
        for s in injected
    ]
    return {
        "separation_arcsec": [float(v) for v in table["separation"]],
        "contrast": [float(v) for v in table["contrast"]],
        "throughput": [float(v) for v in table["throughput"]],
        "noise": [float(v) for v in table["noise"]],
        "threshold": [float(v) for v in table["threshold"]],
        "star_peak": float(table.meta["star_peak"]),
        "masked_candidates": table.meta["masked_candidates"],
        "injected_arcsec": [float(v) for v in injected],
        "injected_throughput": throughput,
    }


def companion(asn: Path, scale: float) -> dict:
    """The simulated companion: its contrast and separation (arcsec)."""
    truth = json.loads((asn.parent / "truth.json").read_text())
    offset = float(np.hypot(*truth["companion_offset"]))
    return {"contrast": truth["contrast"], "separation_arcsec": offset * scale}


def log_interp(x: np.ndarray, xs, ys) -> np.ndarray:
    """ys (positive) at x, interpolated linearly in log y; within half a sample of the ends
    the end's value (an injected separation may fall a rounding or less than a sampling step
    past a curve's last sample), NaN farther out."""
    xs, ys = np.asarray(xs), np.asarray(ys)
    good = np.isfinite(ys) & (ys > 0)
    xs, ys = xs[good], ys[good]
    values = np.exp(np.interp(x, xs, np.log(ys)))
    half = 0.5 * float(np.median(np.diff(xs))) if len(xs) > 1 else 0.0
    return np.where((x >= xs[0] - half) & (x <= xs[-1] + half), values, np.nan)


def side_by_side(separations: np.ndarray, ours: dict, theirs: dict, scale: float) -> list[dict]:
    """Both 5σ curves, and both throughputs, at the injected separations (arcsec)."""
    vip_sep = np.asarray(theirs["distance_arcsec"])
    rows = []
    ours_at = log_interp(separations, ours["separation_arcsec"], ours["contrast"])
    theirs_at = log_interp(separations, vip_sep, theirs["sensitivity_student"])
    vip_throughput = np.interp(separations, vip_sep, theirs["throughput"])
    for i, s in enumerate(separations):
        rows.append(
            {
                "separation_arcsec": float(s),
                "separation_px": float(s / scale),
                "coron_dask_contrast": float(ours_at[i]),
                "vip_contrast": float(theirs_at[i]),
                "vip_over_coron_dask": float(theirs_at[i] / ours_at[i]),
                "coron_dask_throughput": float(ours["injected_throughput"][i]),
                "vip_throughput": float(vip_throughput[i]),
            }
        )
    return rows


def noise_estimators(psf_file: Path, fwhm: float, starphot: float) -> dict:
    """What the two noise estimators predict of the ratio of the curves, from the off-axis
    PSF alone: VIP's contrast is σ(aperture sums) / (throughput × star's aperture flux),
    coron-dask's σ(pixels) / (throughput × star's peak). For white pixel noise σ(aperture
    sums) = σ(pixels) √N, N the aperture's pixels; for noise correlated over the whole
    aperture (speckles, the drizzle's kernel), σ(pixels) N."""
    psf = fits.getdata(psf_file, "SCI").astype(np.float64)
    pixels = math.pi * (fwhm / 2) ** 2
    peak = float(psf.max())
    return {
        "aperture_pixels": pixels,
        "star_aperture_over_peak": starphot / peak,
        "ratio_white_noise": math.sqrt(pixels) * peak / starphot,
        "ratio_fully_correlated": pixels * peak / starphot,
    }


# ---------------------------------------------------------------- the benchmark


def run_dataset(dataset: Dataset, root: Path, repeats: int) -> dict:
    folder = root / dataset.name
    asn = simulate(dataset, folder / "inputs")
    info = observation_info(asn)
    fwhm, scale = info["lambda_over_d_px"], info["pixel_scale_arcsec"]
    noise_sep, radii = separation_grid(info["shape"][0], fwhm)
    separations = radii * scale
    listed = ",".join(f"{s:.6f}" for s in separations)
    contrast_options = ["--offaxis-psf", str(asn.parent / "offaxis_psf.fits")]
    contrast_options += ["--separations", listed]
    contrast_options += ["--position-angles", ",".join(f"{a:g}" for a in POSITION_ANGLES)]
    contrast_options += ["--transmission", "none"]  # VIP dims no injection: like for like
    measurements = {
        "science": lambda: coron_dask("run", asn, folder / "science"),
        "science_no_psfalign": lambda: coron_dask(
            "run", asn, folder / "science-np", "--no-psfalign"
        ),
        "contrast": lambda: coron_dask("contrast", asn, folder / "contrast", *contrast_options),
        "vip": lambda: vip(asn, folder / "vip", info, noise_sep),
    }
    runs: dict[str, list[dict]] = {name: [] for name in measurements}
    for repeat in range(repeats):
        for name, measure_it in measurements.items():
            result = measure_it()
            runs[name].append(result)
            print(
                f"{dataset.name} {repeat + 1}/{repeats} {name}: {result['seconds']:.1f} s, "
                f"{result['peak_memory'] / GIB:.2f} GiB",
                flush=True,
            )
    summary = {
        name: {
            "seconds": median(values, "seconds"),
            "peak_gib": median(values, "peak_memory") / GIB,
        }
        for name, values in runs.items()
    }
    for base in ("science", "science_no_psfalign"):
        summary[f"contrast_over_{base}"] = {
            "seconds": summary["contrast"]["seconds"] / summary[base]["seconds"],
            "peak": summary["contrast"]["peak_gib"] / summary[base]["peak_gib"],
        }
    summary["vip_over_contrast"] = {
        "seconds": summary["vip"]["seconds"] / summary["contrast"]["seconds"],
        "peak": summary["vip"]["peak_gib"] / summary["contrast"]["peak_gib"],
    }
    ours = coron_dask_curve(folder / "contrast")
    theirs = runs["vip"][-1]
    for run in runs["vip"][:-1]:
        run.pop("curve")
    rows = side_by_side(separations, ours, theirs["curve"], scale)
    ratios = [row["vip_over_coron_dask"] for row in rows if np.isfinite(row["vip_over_coron_dask"])]
    for name in ("science", "science-np"):  # their products (a psfalign of GB) go
        shutil.rmtree(folder / name, ignore_errors=True)
    return {
        "dataset": asdict(dataset),
        "observation": info,
        "separations_arcsec": [float(s) for s in separations],
        "vip_noise_sep_px": noise_sep,
        "simulated_companion": companion(asn, scale),
        "repeats": repeats,
        "runs": runs,
        "summary": summary,
        "curves": {
            "coron_dask": ours,
            "vip": theirs["curve"],
            "side_by_side": rows,
            "vip_over_coron_dask_median": float(np.median(ratios)),
            "noise_estimators": noise_estimators(
                asn.parent / "offaxis_psf.fits", fwhm, theirs["starphot"]
            ),
            "vip_starphot_over_total": theirs["starphot"] / theirs["psf_total_flux"],
        },
    }


def markdown(results: dict) -> str:
    settings = results["settings"]
    lines = [
        f"coron-dask {settings['coron_dask']}, VIP {settings['vip_hci']}; {settings['cores']} "
        f"cores; cluster `{' '.join(settings['cluster'])}`, `--truncate {settings['truncate']}`; "
        f"{settings['separations']} separations × position angles "
        f"{', '.join(f'{a:g}' for a in settings['position_angles'])}. Wall time and peak "
        "memory (summed PSS of all processes) are medians of the repeats.",
        "",
        "| dataset | science (`run`) | science (`run --no-psfalign`) | contrast | "
        "contrast / run | contrast / run --no-psfalign | VIP contrast_curve (RDI PCA) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["datasets"].items():
        d, s = row["dataset"], row["summary"]

        def cell(key: str, s=s, runs=row["runs"]) -> str:
            text = f"{s[key]['seconds']:.1f} s, {s[key]['peak_gib']:.2f} GiB"
            if len(runs[key]) > 1:  # the range of the repeats
                seconds = [run["seconds"] for run in runs[key]]
                peaks = [run["peak_memory"] / GIB for run in runs[key]]
                text += (
                    f" ({min(seconds):.1f}–{max(seconds):.1f} s, "
                    f"{min(peaks):.2f}–{max(peaks):.2f} GiB)"
                )
            return text

        def ratio(key: str, s=s) -> str:
            return f"{s[key]['seconds']:.2f}× time, {s[key]['peak']:.2f}× peak"

        lines.append(
            f"| {name} ({d['size']}², {d['sci_exps']}×{d['sci_ints']} sci, "
            f"{d['psf_exps']}×{d['psf_ints']} ref; {row['repeats']} repeat(s)) | "
            f"{cell('science')} | {cell('science_no_psfalign')} | {cell('contrast')} | "
            f"{ratio('contrast_over_science')} | {ratio('contrast_over_science_no_psfalign')} | "
            f"{cell('vip')} |"
        )
    for name, row in results["datasets"].items():
        curves = row["curves"]
        estimators = curves["noise_estimators"]
        lines += [
            "",
            f"5σ contrast, {name} (coron-dask: i2d, pixel annuli, candidates masked; VIP: "
            "mean of derotated residuals, aperture sums; both "
            "Student-t; the simulated companion, contrast "
            f"{row['simulated_companion']['contrast']:g}, is at "
            f'{row["simulated_companion"]["separation_arcsec"]:.3f}"): median VIP / coron-dask '
            f"{curves['vip_over_coron_dask_median']:.2f}; from the PSF alone, "
            f"{estimators['ratio_white_noise']:.2f} for white noise, "
            f"{estimators['ratio_fully_correlated']:.2f} for noise correlated over the "
            "aperture.",
            "",
            "| separation | coron-dask | VIP | VIP / coron-dask | throughput coron-dask | "
            "throughput VIP |",
            "|---|---|---|---|---|---|",
        ]
        for r in curves["side_by_side"]:
            lines.append(
                f'| {r["separation_arcsec"]:.3f}" ({r["separation_px"]:.1f} px) | '
                f"{r['coron_dask_contrast']:.3g} | {r['vip_contrast']:.3g} | "
                f"{r['vip_over_coron_dask']:.2f} | {r['coron_dask_throughput']:.2f} | "
                f"{r['vip_throughput']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "vip":
        vip_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", choices=list(DATASETS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/coron-dask-bench-contrast"))
    parser.add_argument("--repeats", type=int, help="default: the dataset's (demo 5, large 2)")
    parser.add_argument(
        "--tables", action="store_true", help="only rewrite contrast.md from contrast.json"
    )
    args = parser.parse_args()
    from importlib.metadata import version

    import psutil

    path = RESULTS / "contrast.json"
    if args.tables:
        (RESULTS / "contrast.md").write_text(markdown(json.loads(path.read_text())))
        return
    root = args.workdir
    root.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {"datasets": {}}
    results["settings"] = {
        "commit": commit(),
        "coron_dask": version("coron-dask"),
        "vip_hci": version("vip-hci"),
        "python": platform.python_version(),
        "cores": psutil.cpu_count(),
        "memory_gib": psutil.virtual_memory().total / GIB,
        "cluster": CLUSTER,
        "truncate": TRUNCATE,
        "separations": COUNT,
        "position_angles": POSITION_ANGLES,
        "vip_nproc": NPROC,
    }
    for name in args.dataset or list(DATASETS):
        results["datasets"][name] = run_dataset(
            DATASETS[name], root, args.repeats or DATASETS[name].repeats
        )
        results["datasets"][name]["commit"] = commit()
        order = [n for n in DATASETS if n in results["datasets"]]
        results["datasets"] = {n: results["datasets"][n] for n in order}
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
        (RESULTS / "contrast.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
