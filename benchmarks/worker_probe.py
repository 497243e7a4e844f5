"""Where a worker's memory goes at its peak (issue 8): the ooc scenario (320², 2 × 50 science
integrations, 220 references) on a scheduler and 2 workers of LIMIT (default 4GiB) started
here, each polled every 0.2 s for its resident memory, its data by task prefix and the task
it runs; printed at each worker's highest resident memory.

    LIMIT=2GiB python benchmarks/worker_probe.py WORKDIR [coron-dask run options]
"""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from distributed import Client

W = Path(sys.argv[1])
asn = next((W / "in").glob("*_asn.json"), None)
if asn is None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "coron_dask.cli",
            "simulate",
            str(W / "in"),
            "--size",
            "320",
            "--sci-exps",
            "2",
            "--sci-ints",
            "50",
            "--psf-exps",
            "11",
            "--psf-ints",
            "20",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    asn = next((W / "in").glob("*_asn.json"))
env = {
    **os.environ,
    "MALLOC_MMAP_THRESHOLD_": str(2**25),
    "MALLOC_TRIM_THRESHOLD_": str(2**25),
    "MALLOC_ARENA_MAX": "2",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
sf = W / "s.json"
sf.unlink(missing_ok=True)
procs = [
    subprocess.Popen(
        [
            "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dashboard-address",
            ":0",
            "--scheduler-file",
            str(sf),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
]
while not sf.exists():
    time.sleep(0.2)
time.sleep(1)
for _ in range(2):
    procs.append(
        subprocess.Popen(
            [
                "dask",
                "worker",
                "--scheduler-file",
                str(sf),
                "--nthreads",
                "1",
                "--memory-limit",
                os.environ.get("LIMIT", "4GiB"),
                "--host",
                "127.0.0.1",
                "--local-directory",
                str(W),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
c = Client(scheduler_file=str(sf), set_as_default=False)
c.wait_for_workers(2)


def snap(dask_worker):
    import psutil
    from dask.sizeof import sizeof

    groups = {}
    for k in list(dask_worker.data.keys()):
        name = (k[0] if isinstance(k, tuple) else k).rsplit("-", 1)[0]
        try:
            groups[name] = groups.get(name, 0) + sizeof(dask_worker.data[k])
        except Exception:
            pass
    ex = [str(ts.key)[:60] for ts in dask_worker.state.executing]
    return {"rss": psutil.Process().memory_info().rss, "groups": groups, "executing": ex}


best = {}
stop = False


def poll():
    while not stop:
        try:
            for addr, s in c.run(snap).items():
                if s["rss"] > best.get(addr, {"rss": 0})["rss"]:
                    best[addr] = s
        except Exception:
            pass
        time.sleep(0.2)


t = threading.Thread(target=poll, daemon=True)
t.start()
out = W / "out"
r = subprocess.run(
    [
        sys.executable,
        "-m",
        "coron_dask.cli",
        "run",
        str(asn),
        "-o",
        str(out),
        "--scheduler-file",
        str(sf),
        "--truncate",
        "20",
        "--no-progress",
        *sys.argv[2:],  # further options of coron-dask run
    ],
    capture_output=True,
    text=True,
)
stop = True
t.join()
print(r.returncode, [line for line in r.stderr.splitlines() if "plan" in line or "error" in line])
for addr, s in best.items():
    print(addr, round(s["rss"] / 2**30, 3), "GiB; executing", s["executing"])
    for k, v in sorted(s["groups"].items(), key=lambda kv: -kv[1]):
        print(f"   {v / 2**20:8.1f} MiB  {k}")
c.close()
for p in procs:
    p.terminate()
shutil.rmtree(out, ignore_errors=True)
