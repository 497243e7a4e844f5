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
    peak_process: int  # bytes, the largest resident set of any one child (a worker)
    read_bytes: int  # bytes read through read() by all processes (page-cache hits included)
    write_bytes: int
    returncode: int


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peak_process = 0
        self.io: dict[int, tuple[int, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    info = process.memory_full_info()
                    total += info.pss
                    if process.pid != self.root.pid:
                        self.peak_process = max(self.peak_process, info.rss)
                    io = process.io_counters()
                    self.io[process.pid] = (io.read_chars, io.write_chars)
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
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
        peak_process=sampler.peak_process,
        read_bytes=sum(r for r, _ in sampler.io.values()),
        write_bytes=sum(w for _, w in sampler.io.values()),
        returncode=returncode,
    )
