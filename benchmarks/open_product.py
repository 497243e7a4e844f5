"""What opening a product costs (issue 25): the resident memory ``open_product`` adds to a
process, and the bytes that selecting one frame and computing it reads, as ratios to the
file's size and to the frame's.

A psfalign (SCI and ERR, float32, integration × psf × y × x, and its ALIGN table) is written
by coron-dask's own writers, as FITS or as a Zarr store; a fresh process (``--probe``) opens
a small twin first (imports and xarray's one-time set-up are not the open's cost), then the
product, and reports:

- ``open_rss``: the peak resident memory (VmHWM, the high-water mark reset just before)
  over the resident memory before the open: what the open needed at its busiest;
- ``frame_read``: the bytes the process read (``rchar`` of /proc/self/io: every byte read()
  handed it, from the disk or the page cache alike; ``read_bytes`` counts only the disk, and
  a file just written is in the page cache) while one frame was selected and computed;
  a memory map's pages would escape ``rchar``, and show in the resident memory instead.

    python -m benchmarks.open_product                   # 368 MB, FITS and Zarr
    python -m benchmarks.open_product --frames 90 5 --size 320 --format fits
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import dask.array as da
import numpy as np

from coron_dask.io import Column, Extension, Product, table, write_products

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: A celestial WCS, so that the product opens with ra and dec as a real one does.
WCS = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 80.0, "CRVAL2": -69.5}
WCS |= {"CRPIX1": 160.0, "CRPIX2": 160.0, "CDELT1": -1.7e-5, "CDELT2": 1.7e-5}
#: The frame read: (integration, psf).
FRAME = (1, 1)


def write_psfalign(
    folder: Path, integrations: int, psfs: int, size: int, fmt: str = "fits", seed: int = 0
) -> Path:
    """A psfalign of ``integrations`` × ``psfs`` frames of ``size``² (SCI, ERR: random
    float32) and its ALIGN table, written by ``write_products`` as ``fmt`` (fits, zarr)."""
    path = folder / f"jw90001001001_03106_00001_nrcalong_psfalign.{fmt}"
    shape = (integrations, psfs, size, size)
    random = da.random.default_rng(seed)
    frames = (1, psfs, size, size)
    dims = ("integration", "psf", "y", "x")
    sci = random.random(shape, dtype=np.float32, chunks=frames)
    err = random.random(shape, dtype=np.float32, chunks=frames)
    rows = integrations * psfs
    fitted = np.random.default_rng(seed).normal(size=(3, rows))
    align = table(
        "ALIGN",
        [
            Column("INTEGRATION", np.repeat(np.arange(1, integrations + 1), psfs).astype("i4")),
            Column("PSF", np.tile(np.arange(psfs), integrations).astype("i4")),
            *(Column(name, v) for name, v in zip(("DX", "DY", "BETA"), fitted, strict=True)),
        ],
        {"ALIGN_TO": "each"},
    )
    extensions = [Extension("SCI", sci, dict(WCS), dims), Extension("ERR", err, {}, dims), align]
    product = Product(path, {"TELESCOP": "JWST", "INSTRUME": "NIRCAM"}, extensions)
    write_products([product], compute=lambda *writes: da.compute(*writes, scheduler="threads"))
    return path


def _peak_reset() -> None:
    """Start the resident memory's high-water mark (VmHWM) from the present (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _read_chars() -> int:
    """rchar of /proc/self/io: bytes this process has read through read() and its kin."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


def probe(path: Path, twin: Path) -> dict:
    """In this process: the open of ``path`` and the read of one of its frames (after the
    same done once on ``twin``, a small product of the same kind and format)."""
    from coron_dask.io import open_product

    open_product(twin)["SCI"].isel(integration=0, psf=0).load()  # imports, set-up
    _peak_reset()
    before = _status("VmRSS")
    dataset = open_product(path)
    repr(dataset)
    opened = {"open_rss": _status("VmHWM") - before, "kept_rss": _status("VmRSS") - before}
    chars = _read_chars()
    frame = dataset["SCI"].isel(integration=FRAME[0], psf=FRAME[1]).values
    read = _read_chars() - chars
    chunk = dataset["SCI"].data.chunksize
    return {**opened, "frame_read": read, "frame_bytes": frame.nbytes, "chunk": list(chunk)}


def measure(*pairs: tuple[Path, Path]) -> list[dict]:
    """``probe`` of each (product, twin) in turn, in one fresh process; with the product's
    size on disk and the ratios."""
    command = [sys.executable, "-m", "benchmarks.open_product", "--probe"]
    command += [str(p) for pair in pairs for p in pair]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    rows = json.loads(out.stdout.splitlines()[-1])
    for row, (path, _) in zip(rows, pairs, strict=True):
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        row["file_bytes"] = sum(p.stat().st_size for p in files)
        row["open_rss_ratio"] = row["open_rss"] / row["file_bytes"]
        row["frame_read_ratio"] = row["frame_read"] / row["frame_bytes"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--frames", nargs=2, type=int, default=(90, 5), metavar=("INTS", "PSFS"))
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--format", choices=("fits", "zarr"), action="append")
    args = parser.parse_args()
    if args.probe:
        paths = [Path(p) for p in args.probe]
        print(json.dumps([probe(*pair) for pair in zip(paths[::2], paths[1::2], strict=True)]))
        return
    formats = args.format or ["fits", "zarr"]
    with tempfile.TemporaryDirectory() as folder:
        pairs = []
        for fmt in formats:
            work = Path(folder) / fmt
            (work / "twin").mkdir(parents=True)
            twin = write_psfalign(work / "twin", 2, args.frames[1], 16, fmt)
            pairs.append((write_psfalign(work, *args.frames, args.size, fmt), twin))
        rows = dict(zip(formats, measure(*pairs), strict=True))
    print(json.dumps(rows, indent=2))
    RESULTS.mkdir(exist_ok=True)
    key = f"{args.frames[0]}x{args.frames[1]}x{args.size}^2"
    path = RESULTS / "open_product.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = rows
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
