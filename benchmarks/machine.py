"""This machine's own limits, measured the way the pipeline uses it (one thread per task):
float64 matrix-multiply rate, real-FFT throughput, disk write speed, and the rates at
which a new file is written into the page cache (into pages freed lately, and into memory
not used for a while) and a file just written reads back.
Rates are of the operation alone: warm, into memory allocated beforehand (a fresh array
of a few MB can cost more in page faults than the FFT that fills it)."""

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
        f"a = np.random.default_rng(0).normal(size=({n}, {n})); c = a @ a\n"
        "t = min((lambda s: (np.matmul(a, a, out=c), time.perf_counter() - s)[1])"
        "(time.perf_counter()) for _ in range(5))\n"
        f"print(2 * {n}**3 / t / 1e9)\n"
    )
    return _single_thread(code)


def _single_thread(code: str) -> float:
    """The number ``code`` prints, run in a process limited to one BLAS thread."""
    result = subprocess.run(
        [sys.executable, "-c", code], env=_SINGLE_THREAD, check=True, capture_output=True, text=True
    )
    return float(result.stdout)


def fft_seconds(size: int, batch: int = 16) -> float:
    """Seconds per float64 real 2-D FFT (the mean of forward and inverse) of a size×size
    frame, warm, into arrays allocated beforehand, in a process of its own. The inverse is
    timed in its two passes, in place, as the shift makes it (numpy's irfft2 adds a fresh
    temporary, whose page faults cost more than the transform here)."""
    code = (
        "import numpy as np, time\n"
        f"frames = np.random.default_rng(0).normal(size=({batch}, {size}, {size}))\n"
        "spectra = np.fft.rfft2(frames)\n"
        "work = spectra.copy()\n"
        "def best(f):\n"
        "    for _ in range(5): f()\n"
        "    t = []\n"
        "    for _ in range(15):\n"
        "        s = time.perf_counter(); f(); t.append(time.perf_counter() - s)\n"
        "    return min(t)\n"
        "forward = best(lambda: np.fft.rfft2(frames, out=spectra))\n"
        "# the columns' complex pass, there and back (no drift), then the rows' real one\n"
        "columns = best(lambda: (np.fft.fft(work, axis=-2, out=work),"
        " np.fft.ifft(work, axis=-2, out=work))) / 2\n"
        f"rows = best(lambda: np.fft.irfft(spectra, n={size}, axis=-1, out=frames))\n"
        f"print((forward + columns + rows) / 2 / {batch})\n"
    )
    return _single_thread(code)


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


def _written_gbps(handle: object, block: bytes, megabytes: int) -> float:
    """GB/s of writing ``megabytes`` into the page cache through ``handle``, ``block`` at a
    time (not synced)."""
    start = time.perf_counter()
    for _ in range(megabytes * 2**20 // len(block)):
        handle.write(block)
    handle.flush()
    return megabytes * 2**20 / 1e9 / (time.perf_counter() - start)


def cache_write_gbps(folder: str, megabytes: int = 512, chunk: int = 64) -> float:
    """GB/s at which a new file is written into the page cache, ``chunk`` MB at a time from
    one buffer, as the shift tasks write the aligned blocks: the best of three files, the
    later ones landing on the pages the earlier ones freed (``fresh_write_gbps`` for memory
    not used lately)."""
    block = np.random.default_rng(0).bytes(chunk * 2**20)
    rates = []
    for _ in range(3):
        with tempfile.NamedTemporaryFile(dir=folder) as handle:
            rates.append(_written_gbps(handle, block, megabytes))
    return max(rates)


def fresh_write_gbps(folder: str, megabytes: int = 4096, part: int = 256, chunk: int = 64) -> float:
    """GB/s of the slowest ``part`` MB of a new file of ``megabytes`` written into the page
    cache: once the pages freed lately run out (``cache_write_gbps`` writes into those),
    the kernel hands out memory it has not used for a while, and a virtual machine's host
    backs each such page as the guest first touches it. What a run's large psfalign meets
    after its first few hundred MB, here. Measured before the other rates, whose files
    free pages of their own."""
    block = np.random.default_rng(1).bytes(chunk * 2**20)
    with tempfile.NamedTemporaryFile(dir=folder) as handle:
        return min(_written_gbps(handle, block, part) for _ in range(megabytes // part))


def read_back_gbps(folder: str, megabytes: int = 512, chunk: int = 64) -> float:
    """GB/s at which a file just written reads back (from the page cache, as KLIP reads the
    aligned references), ``chunk`` MB at a time into one buffer larger than the caches:
    the best of five reads."""
    block = np.random.default_rng(0).bytes(chunk * 2**20)
    buffer = bytearray(len(block))
    with tempfile.NamedTemporaryFile(dir=folder) as handle:
        for _ in range(megabytes // chunk):
            handle.write(block)
        handle.flush()
        with open(handle.name, "rb", buffering=0) as reader:

            def read_all() -> None:
                reader.seek(0)
                while reader.readinto(buffer):
                    pass

            return megabytes * 2**20 / 1e9 / _best(read_all)


def limits(folder: str) -> dict:
    """All of the above, for the results file."""
    fresh = fresh_write_gbps(folder)
    return {
        "cores": os.cpu_count(),
        "matmul_gflops_1_thread": round(matmul_gflops(), 2),
        "fft_ms_160": round(fft_seconds(160) * 1e3, 4),
        "fft_ms_320": round(fft_seconds(320) * 1e3, 4),
        "disk_write_mbps": round(disk_write_mbps(folder), 1),
        "read_back_gbps": round(read_back_gbps(folder), 2),
        "cache_write_gbps": round(cache_write_gbps(folder), 2),
        "fresh_write_gbps": round(fresh, 2),
    }
