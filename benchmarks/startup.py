"""Fixed cost: ``coron-dask run`` on a tiny association against a Python process that
only imports the libraries it is built on (issue 12: at most 0.5 s more).

Each command runs as a whole process, ``--repeats`` times, interleaved so that a busy
spell of the machine weighs on both; the median is reported, with where the run's own
time goes (its log's timestamps: imports and input checks, cluster, graph, compute).

    python -m benchmarks.startup                  # 48², 2 × 2 integrations, 2 × 2 refs
    python -m benchmarks.startup --repeats 9 -- --n-workers 2
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.run import RESULTS, Scenario, simulate

LIBRARIES = "import numpy, scipy.fft, dask.array, distributed, xarray, astropy.io.fits"
TINY = Scenario("tiny", 48, 2, 2, 2, 2)


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("run_options", nargs="*", help="more options for coron-dask run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        cli = [sys.executable, "-m", "coron_dask.cli"]
        asn = simulate(TINY, work / "in")
        run = [*cli, "run", asn, "--psfmask", work / "in" / "psfmask.fits", "--no-progress"]
        imports, runs = [], []
        for i in range(args.repeats):
            imports.append(seconds([sys.executable, "-c", LIBRARIES]))
            runs.append(seconds([*run, "-o", work / f"out{i}", *args.run_options]))
    row = {
        "imports_s": statistics.median(imports),
        "run_s": statistics.median(runs),
        "runs": runs,
        "imports": imports,
        "options": args.run_options,
    }
    row["fixed_cost_s"] = row["run_s"] - row["imports_s"]
    print(json.dumps(row, indent=2))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "startup.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    rows[" ".join(args.run_options) or "defaults"] = row  # one row per set of options
    path.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
