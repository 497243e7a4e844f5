"""Frames aligned per second against how the run computes on this machine: in process on
one thread (dask's synchronous scheduler) or on threads (the default for a small run), and
on a LocalCluster of 1 or 2 worker processes of 1 or 2 threads; with the share of the
cores' time no task ran (the wall time times the threads, less the tasks' seconds from
``--stats``: start-up, scheduling, waiting).

    python -m benchmarks.scaling          # 160², 2 × 20 integrations × 48 references
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import RESULTS, SCENARIOS, simulate

#: the like-for-like dataset (160², 2 × 20 integrations × 48 references)
DATA = SCENARIOS["like-for-like"]
#: (name, threads the run computes on, options, threads per LocalCluster worker)
SETUPS = [
    ("in process, 1 thread", 1, ["--scheduler", "synchronous"], 1),
    ("in process, 2 threads", 2, [], 1),
    ("1 worker × 1 thread", 1, ["--n-workers", "1"], 1),
    ("1 worker × 2 threads", 2, ["--n-workers", "1"], 2),
    ("2 workers × 1 thread", 2, ["--n-workers", "2"], 1),
]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cli = [sys.executable, "-m", "coron_dask.cli"]
        asn = simulate(DATA, work / "in")
        for number, (name, threads, options, per_worker) in enumerate(SETUPS):
            out, stats = work / f"out{number}", work / f"stats{number}.json"
            command = [*cli, "run", asn, "-o", out, "--psfmask", work / "in" / "psfmask.fits"]
            command += ["--skip", "resample", "--no-progress", "--stats", stats, *options]
            start = time.perf_counter()
            env = {**os.environ, "DASK_CORON_DASK__CLUSTER__THREADS_PER_WORKER": str(per_worker)}
            subprocess.run(command, check=True, capture_output=True, env=env)
            seconds = time.perf_counter() - start
            stages = json.loads(stats.read_text())["stages"]
            busy = sum(stage["seconds"] for stage in stages.values())
            rows.append(
                {
                    "setup": name,
                    "seconds": seconds,
                    "frames_per_s": DATA.pairs / seconds,
                    "task_seconds": busy,
                    "idle_share": max(0.0, 1 - busy / (seconds * threads)),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    lines = ["| setup | wall | frames/s | task seconds | idle share of the threads |"]
    lines.append("|---|---|---|---|---|")
    for row in rows:
        lines.append(
            f"| {row['setup']} | {row['seconds']:.1f} s | {row['frames_per_s']:.0f} | "
            f"{row['task_seconds']:.1f} | {row['idle_share']:.0%} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
