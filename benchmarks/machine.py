"""This machine's own limits, measured the way the pipeline uses it (one thread per task):
float64 matrix-multiply rate, real-FFT throughput and disk write speed."""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

_SINGLE_THREAD = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


def _best(function, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(n: int = 1024) -> float:
    """float64 GFLOP/s of an n×n matrix product, in a process limited to one BLAS thread."""
    code = (
        "import numpy as np, time\n"
        f"a = np.random.default_rng(0).normal(size=({n}, {n})); a @ a\n"
        "t = min((lambda s: (a @ a, time.perf_counter() - s)[1])(time.perf_counter())"
        " for _ in range(5))\n"
        f"print(2 * {n}**3 / t / 1e9)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_SINGLE_THREAD, check=True, capture_output=True, text=True
    )
    return float(result.stdout)


def fft_seconds(size: int, batch: int = 16) -> float:
    """Seconds per float64 real 2-D FFT (forward or inverse) of a size×size frame."""
    frames = np.random.default_rng(0).normal(size=(batch, size, size))
    spectra = np.fft.rfft2(frames)
    forward = _best(lambda: np.fft.rfft2(frames)) / batch
    inverse = _best(lambda: np.fft.irfft2(spectra, s=(size, size))) / batch
    return (forward + inverse) / 2


def disk_write_mbps(folder: str, megabytes: int = 1024) -> float:
    """Sequential write speed (MB/s) to ``folder``, synced to disk."""
    block = np.random.default_rng(0).bytes(2**20)
    with tempfile.NamedTemporaryFile(dir=folder) as handle:
        start = time.perf_counter()
        for _ in range(megabytes):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
        return megabytes * 2**20 / 1e6 / (time.perf_counter() - start)


def limits(folder: str) -> dict:
    """All of the above, for the results file."""
    return {
        "cores": os.cpu_count(),
        "matmul_gflops_1_thread": round(matmul_gflops(), 2),
        "fft_ms_160": round(fft_seconds(160) * 1e3, 4),
        "fft_ms_320": round(fft_seconds(320) * 1e3, 4),
        "disk_write_mbps": round(disk_write_mbps(folder), 1),
    }
