"""Time ``coron-dask run`` against jwst 3.0.0's functions on the same simulated data.

Both run as whole processes (start-up, cluster start and I/O included); the products are
compared so that the ratio is between equal results. Usage:

    python -m benchmarks.versus_jwst --size 160 --sci-ints 16 --psf-exps 8 --psf-ints 5
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from coron_dask.simulate import simulate

JWST_SCRIPT = """
import sys, numpy as np
from pathlib import Path
from tests.jwst_reference import coron3
result = coron3(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
np.savez(sys.argv[4], **{f"{root}/{key}": value for root, arrays in result.items()
                         for key, value in arrays.items()})
"""


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--sci-exps", type=int, default=2)
    parser.add_argument("--sci-ints", type=int, default=16)
    parser.add_argument("--psf-exps", type=int, default=8)
    parser.add_argument("--psf-ints", type=int, default=5)
    parser.add_argument("--align-to", choices=["each", "first"], default="each")
    parser.add_argument("--n-workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        asn = simulate(
            folder / "inputs",
            size=args.size,
            sci_exps=args.sci_exps,
            sci_ints=args.sci_ints,
            psf_exps=args.psf_exps,
            psf_ints=args.psf_ints,
        )
        mask = folder / "inputs" / "psfmask.fits"
        ours = timed(
            [
                sys.executable,
                "-m",
                "coron_dask.cli",
                "run",
                str(asn),
                "-o",
                str(folder / "out"),
                "--psfmask",
                str(mask),
                "--align-to",
                args.align_to,
                "--n-workers",
                str(args.n_workers),
                "--no-progress",
            ]
        )
        theirs = timed(
            [
                sys.executable,
                "-c",
                JWST_SCRIPT,
                str(asn),
                str(mask),
                args.align_to,
                str(folder / "jwst.npz"),
            ]
        )
        reference = np.load(folder / "jwst.npz")
        parity = {}
        for key in reference.files:
            root, name = key.split("/")
            if name not in ("psfalign_sci", "psfsub_sci"):
                continue
            product = folder / "out" / f"{root}_c1000_{name.split('_')[0]}.fits"
            ours_data = fits.getdata(product, "SCI").astype(np.float64)
            diff = np.linalg.norm(ours_data - reference[key]) / np.linalg.norm(reference[key])
            parity[name] = max(parity.get(name, 0.0), float(diff))
    report = {
        "shape": vars(args),
        "coron_dask_s": round(ours, 2),
        "jwst_s": round(theirs, 2),
        "speedup": round(theirs / ours, 1),
        "max_relative_l2": parity,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
