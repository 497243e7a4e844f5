"""Taking up a stopped run: how long the same command takes to finish a run stopped at
about 70 % of its time, against the whole run, and whether its products are bit-identical.

A simulated observation (MIRI 4QPM frames by default) is run whole on a LocalCluster, then
stopped with SIGKILL (a node lost: nothing runs on the way out) and with SIGTERM (a
walltime, scancel) at ``--at`` of the whole run (once it has written the blocks the whole
run had written at that share of its time: the machine's load varies), and run again with
the same command. Results go to benchmarks/results/resume.json and resume.md.

    python -m benchmarks.resume                    # 2 × 40 integrations × 216 references
    python -m benchmarks.resume --sci-ints 10 --at 0.5

It exits 1 if a rerun is not bit-identical or takes more than ``--target`` of the whole
run (the figure issue 25 asks for: half).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.hashes import fingerprints

RESULTS = Path(__file__).parent / "results"
REUSED = re.compile(r"resume: reusing (\d+) of (\d+) blocks written before \((.*)\)")


def coron_dask(*args: object) -> list[str]:
    return [sys.executable, "-m", "coron_dask", *map(str, args)]


def recorded(out: Path) -> int:
    """How many blocks the run into ``out`` has recorded as written so far."""
    blocks = out / ".coron-dask-resume" / "blocks"
    try:
        return sum(1 for item in blocks.glob("*/*/*") if "." not in item.name)
    except OSError:  # removed while counted: the run is ending
        return 0


def timed(command: list[str], out: Path, stop_at: int | None = None, number: int = 0) -> dict:
    """Run ``command`` (writing into ``out``): its wall time, exit code, stderr, and the
    blocks it had recorded over time; ``stop_at``: send it signal ``number`` once it has
    recorded that many blocks (to its process; SIGKILL to its whole process group, as a
    lost node takes the workers with it)."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    progress, stopped = [], False
    reader = ThreadPoolExecutor(1).submit(process.stderr.read)  # no pipe filling up
    try:
        while process.poll() is None:
            count = recorded(out)
            progress.append((time.perf_counter() - start, count))
            if stop_at is not None and count >= stop_at and not stopped:
                if number == signal.SIGKILL:
                    os.killpg(process.pid, number)
                else:
                    process.send_signal(number)
                stopped = True
            time.sleep(0.05)
        err = reader.result()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    return {
        "seconds": time.perf_counter() - start,
        "code": process.returncode,
        "stopped": stopped,
        "kept": recorded(out),
        "progress": progress,
        "last_line": err.strip().splitlines()[-1] if err.strip() else "",
        "stderr": err,
    }


def stopped_and_taken_up(run: list[str], out: Path, whole: dict, at: float, number: int) -> dict:
    """The run stopped by signal ``number`` once it has written what the whole run had
    written at ``at`` of its time (a stop at a point of the work, whatever the machine's
    load), then the same command again: times, what was reused, bit-identity."""
    shutil.rmtree(out, ignore_errors=True)
    when = whole["seconds"] * at
    target = max(count for seconds, count in whole["progress"] if seconds <= when)
    stopped = timed(run, out, max(target, 1), number)
    if not stopped["stopped"]:
        raise RuntimeError(f"the run ended before it was stopped: {stopped['last_line']}")
    again = timed(run, out)
    if again["code"] != 0:
        raise RuntimeError(f"the run taken up failed: {again['stderr'][-3000:]}")
    reused = REUSED.search(again["stderr"])
    return {
        "signal": signal.Signals(number).name,
        "stopped_after_blocks": target,
        "stopped_at_seconds": round(stopped["seconds"], 1),
        "stopped_code": stopped["code"],
        "stopped_last_line": stopped["last_line"],
        "blocks_kept": stopped["kept"],
        "rerun_seconds": round(again["seconds"], 1),
        "rerun_over_whole": round(again["seconds"] / whole["seconds"], 3),
        "blocks_reused": int(reused.group(1)) if reused else 0,
        "blocks": int(reused.group(2)) if reused else None,
        "reused_by_kind": reused.group(3) if reused else "",
        "bit_identical": fingerprints(out) == whole["fingerprints"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instrument", default="miri", choices=["miri", "nircam"])
    parser.add_argument("--size", type=int, default=160, help="NIRCam frame size")
    parser.add_argument("--sci-ints", type=int, default=40)
    parser.add_argument("--psf-exps", type=int, default=18)
    parser.add_argument("--psf-ints", type=int, default=12)
    parser.add_argument("--n-workers", type=int, default=2)
    parser.add_argument("--at", type=float, default=0.7, help="when to stop, of the whole run")
    parser.add_argument("--target", type=float, default=0.5, help="rerun / whole at most")
    parser.add_argument("--work", type=Path, help="where to simulate and run (default: a temp)")
    args = parser.parse_args(argv)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="resume-bench-", dir=args.work))
    try:
        inputs = work / "inputs"
        subprocess.run(
            coron_dask(
                "simulate",
                inputs,
                "--instrument",
                args.instrument,
                "--size",
                args.size,
                "--sci-exps",
                2,
                "--sci-ints",
                args.sci_ints,
                "--psf-exps",
                args.psf_exps,
                "--psf-ints",
                args.psf_ints,
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
        asn = next(inputs.glob("*_asn.json"))
        out = work / "out"
        run = coron_dask(
            "run",
            asn,
            "-o",
            out,
            "--psfmask",
            inputs / "psfmask.fits",
            "--n-workers",
            args.n_workers,
        )
        whole = timed(run, out)
        if whole["code"] != 0:
            raise RuntimeError(f"the whole run failed: {whole['stderr'][-3000:]}")
        whole["fingerprints"] = fingerprints(out)
        plan = next(line for line in whole["stderr"].splitlines() if "block plan:" in line)
        results = {
            "dataset": {
                "instrument": args.instrument,
                "frame": "224×288" if args.instrument == "miri" else f"{args.size}²",
                "science": f"2 × {args.sci_ints}",
                "references": args.psf_exps * args.psf_ints,
                "workers": args.n_workers,
                "block_plan": plan.split("block plan: ", 1)[1],
            },
            "whole_seconds": round(whole["seconds"], 1),
            "whole_blocks": max((count for _, count in whole["progress"]), default=0),
            "stopped_at": args.at,
            "runs": [
                stopped_and_taken_up(run, out, whole, args.at, number)
                for number in (signal.SIGKILL, signal.SIGTERM)
            ],
        }
        # the machine is shared: the whole run again, after, shows how much its time varies
        shutil.rmtree(out)
        results["whole_again_seconds"] = round(timed(run, out)["seconds"], 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resume.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    (RESULTS / "resume.md").write_text(markdown(results))
    print(markdown(results))
    runs = results["runs"]
    met = all(r["bit_identical"] and r["rerun_over_whole"] <= args.target for r in runs)
    return 0 if met else 1


def markdown(results: dict) -> str:
    data = results["dataset"]
    lines = [
        "# Taking up a stopped run (`python -m benchmarks.resume`)",
        "",
        f"{data['instrument']} {data['frame']}, {data['science']} science integrations × "
        f"{data['references']} references, {data['workers']} LocalCluster workers on this "
        f"machine; block plan: {data['block_plan']}. Whole run: {results['whole_seconds']} s "
        f"({results['whole_again_seconds']} s run again after the others: the machine is "
        f"shared). Each run was stopped once it had written as many blocks as the whole run "
        f"had at {results['stopped_at']:.0%} of its time, then the same command run again.",
        "",
        "| signal | stopped after | blocks kept | reused | rerun | rerun / whole | bit-identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        lines.append(
            f"| {run['signal']} | {run['stopped_at_seconds']} s | {run['blocks_kept']} | "
            f"{run['blocks_reused']} of {run['blocks']} | {run['rerun_seconds']} s | "
            f"{run['rerun_over_whole']} | {'yes' if run['bit_identical'] else 'NO'} |"
        )
    lines += ["", "Reused, by product and extension:", ""]
    lines += [f"- {run['signal']}: {run['reused_by_kind']}" for run in results["runs"]]
    lines += ["", "The line the SIGTERM run ended with:", ""]
    lines += [
        f"    {run['stopped_last_line']}" for run in results["runs"] if run["signal"] == "SIGTERM"
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
