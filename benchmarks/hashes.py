"""Fingerprints of a run's products, to show that a change leaves them bit-identical.

``python -m benchmarks.hashes DIR [--compare BEFORE.json]`` hashes every product under DIR:
each FITS extension's data (image bytes, or a table's columns) and its header cards other
than the date of the run (and the predicted worker peak the block plan's HISTORY quotes);
ECSV tables without their comment lines (which hold the date); Zarr stores array by array.
With ``--compare`` it says which differ from a saved fingerprint.
"""

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
from astropy.io import fits

#: Header keywords that differ between two runs of the same code on the same data, and the
#: run's date where a card's text quotes it (HISTORY), and the block plan's predicted worker
#: peak there (it follows the memory measured on the workers as they start).
VARYING = ("DATE",)
WHEN = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+")
PEAK = re.compile(r"peak [\d.]+ GiB")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _fits(path: Path) -> dict:
    fingerprint = {}
    with fits.open(path, memmap=False) as hdul:
        for index, hdu in enumerate(hdul):
            name = f"{index}:{hdu.name}"
            data = hdu.data
            if data is None:
                fingerprint[f"{name}/data"] = None
            elif isinstance(hdu, fits.BinTableHDU):
                fingerprint[f"{name}/data"] = _digest(np.asarray(data).tobytes())
            else:
                fingerprint[f"{name}/data"] = _digest(np.ascontiguousarray(data).tobytes())
            cards = [str(card) for card in hdu.header.cards if card.keyword not in VARYING]
            text = PEAK.sub("peak <measured>", WHEN.sub("<date>", "\n".join(cards)))
            fingerprint[f"{name}/header"] = _digest(text.encode())
    return fingerprint


def _zarr(path: Path) -> dict:
    import zarr

    group = zarr.open_group(path, mode="r")
    return {
        name: _digest(np.ascontiguousarray(array[...]).tobytes())
        for name, array in sorted(group.arrays())
    }


def fingerprints(folder: Path) -> dict:
    """Every product under ``folder`` (by its path relative to it) and its fingerprint."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.suffix == ".fits" and path.is_file():
            found[key] = _fits(path)
        elif path.suffix == ".zarr" and path.is_dir():
            found[key] = _zarr(path)
        elif path.suffix == ".ecsv":
            lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
            found[key] = {"rows": _digest("\n".join(lines).encode())}
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--compare", type=Path, help="a fingerprint saved before")
    parser.add_argument("-o", "--output", type=Path, help="save the fingerprint (JSON)")
    args = parser.parse_args(argv)
    now = fingerprints(args.folder)
    if args.output:
        args.output.write_text(json.dumps(now, indent=1, sort_keys=True))
    if not args.compare:
        print(f"{len(now)} products fingerprinted")
        return 0
    before = json.loads(args.compare.read_text())
    differ = [
        f"{product} {part}"
        for product in sorted(set(before) | set(now))
        for part in sorted(set(before.get(product, {})) | set(now.get(product, {})))
        if before.get(product, {}).get(part, "missing") != now.get(product, {}).get(part, "missing")
    ]
    for line in differ:
        print(f"differs: {line}")
    print(f"{len(now)} products, {len(differ)} parts differ from {args.compare}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
