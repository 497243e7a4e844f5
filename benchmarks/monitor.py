"""Whole-process measurements: wall time, peak memory and I/O of a command and all its
children (the LocalCluster's scheduler, nannies and workers included)."""

import subprocess
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measurement:
    seconds: float
    peak_memory: int  # bytes, the largest sum of proportional set sizes seen
    peak_worker: int  # bytes, the largest resident set of any one dask worker process
    peak_client: int  # bytes, the largest resident set of the command's own process
    trace: list  # (seconds, [resident set of each worker process]) every sample
    read_bytes: int  # bytes read through read() by all processes (page-cache hits included)
    write_bytes: int
    returncode: int


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_worker = 0
        self.peak_client = 0
        self.trace: list = []
        self.began = time.perf_counter()
        self.io: dict[int, tuple[int, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total, workers = 0, []
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    info = process.memory_full_info()
                    total += info.pss
                    command = " ".join(process.cmdline())
                    if "spawn_main" in command or "dask worker" in command:
                        workers.append(info.rss)
                    elif "coron_dask" in command:
                        self.peak_client = max(self.peak_client, info.rss)
                    io = process.io_counters()
                    self.io[process.pid] = (io.read_chars, io.write_chars)
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self.peak_worker = max([self.peak_worker, *workers])
            self.trace.append((round(time.perf_counter() - self.began, 2), workers))
            self.stop.wait(self.interval)


def measure(command: list[str], interval: float = 0.1, **kwargs) -> Measurement:
    """Run ``command`` to its end, sampling the memory of its process tree every ``interval``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, **kwargs)
    sampler = _Sampler(process.pid, interval)
    sampler.start()
    returncode = process.wait()
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    return Measurement(
        seconds=seconds,
        peak_memory=sampler.peak,
        peak_worker=sampler.peak_worker,
        peak_client=sampler.peak_client,
        trace=sampler.trace,
        read_bytes=sum(r for r, _ in sampler.io.values()),
        write_bytes=sum(w for _, w in sampler.io.values()),
        returncode=returncode,
    )
