"""Where a worker's memory goes at its peak (issue 8): a benchmark scenario run by
``coron-dask run`` on a LocalCluster started here as a run starts its own (the scenario's
workers and memory limit), each worker polled every 0.2 s for its resident memory, its data
by task prefix and the task it runs; printed at each worker's highest resident memory.

    python -m benchmarks.worker_probe ooc-4GiB WORKDIR [further coron-dask run options]
"""

import shutil
import subprocess
import sys
import threading
from pathlib import Path

from benchmarks.run import SCENARIOS, simulate
from coron_dask.runtime.deploy import Cluster

INTERVAL = 0.2  # seconds between polls


def snapshot(dask_worker: object) -> dict:
    """On a worker: its resident memory, the bytes of its data by task prefix, what runs."""
    import psutil
    from dask.sizeof import sizeof

    memory = getattr(dask_worker.data, "fast", dask_worker.data)  # not what was spilled
    groups: dict[str, int] = {}
    for key in list(memory.keys()):
        name = (key[0] if isinstance(key, tuple) else key).rsplit("-", 1)[0]
        try:
            groups[name] = groups.get(name, 0) + sizeof(memory[key])
        except KeyError:  # released since the keys were listed
            pass
    running = [str(task.key)[:60] for task in dask_worker.state.executing]
    return {"rss": psutil.Process().memory_info().rss, "groups": groups, "executing": running}


def probe(scenario_name: str, work: Path, options: list[str]) -> None:
    scenario = SCENARIOS[scenario_name]
    asn = next((work / "inputs").glob("*_asn.json"), None) or simulate(scenario, work / "inputs")
    peaks: dict[str, dict] = {}
    done = threading.Event()
    with Cluster(
        n_workers=scenario.workers, memory_limit=scenario.memory_limit, quiet=True
    ) as cluster:
        client = cluster.client

        def poll() -> None:
            while not done.wait(INTERVAL):
                try:
                    for address, state in client.run(snapshot).items():
                        if state["rss"] > peaks.get(address, {"rss": 0})["rss"]:
                            peaks[address] = state
                except OSError:  # a worker restarting
                    pass

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        command = [sys.executable, "-m", "coron_dask.cli", "run", str(asn), "-o"]
        command += [str(work / "out"), "--scheduler", client.scheduler.address, "--no-progress"]
        result = subprocess.run(
            [*command, *scenario.extra, *options], capture_output=True, text=True
        )
        done.set()
        poller.join()
    shutil.rmtree(work / "out", ignore_errors=True)  # the products (18 GB for ooc-*)
    lines = result.stderr.splitlines()
    print(result.returncode, [line for line in lines if "plan" in line or "error" in line])
    for address, state in peaks.items():
        print(address, round(state["rss"] / 2**30, 3), "GiB; executing", state["executing"])
        for name, size in sorted(state["groups"].items(), key=lambda item: -item[1]):
            print(f"   {size / 2**20:8.1f} MiB  {name}")


if __name__ == "__main__":
    probe(sys.argv[1], Path(sys.argv[2]), sys.argv[3:])
