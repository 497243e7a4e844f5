"""Time jwst 3.0.0's calwebb_coron3 as shipped, offline, on an association.

Runs ``jwst.pipeline.Coron3Pipeline`` unchanged: the members are read as jwst reads them
(float32), the references are stacked (stack_refs), then for each science exposure they are
aligned (align_refs, with PSFMASK given as ``override_psfmask``) and subtracted (klip). The
psfstack, psfalign and psfsub products are written to OUTDIR. outlier_detection and resample
are skipped; they belong to a later issue. With resample skipped, the shipped pipeline still
saves its input: one unresampled psfsub integration per ``*_<n>_i2d.fits`` file. That write is
part of the timed run (under a second at 320², 2×10 integrations), but those files are not
listed as products.

Nothing goes on the network. Step parameters are not looked up in CRDS
(STPIPE_DISABLE_CRDS_STEPPARS, and the pipeline is built directly instead of through
``call``). The only reference file, the PSFMASK, is an override, so no best references are
asked for. jwst still records a CRDS context in each product. To keep that local, the run gets
a throwaway CRDS cache: the CRDS_*PATH* variables are cleared, then CRDS_PATH is set to a
temporary folder that holds only a ``server_config``, CRDS_SERVER_URL to a "serverless" URL
(CRDS then makes no calls to a server), CRDS_CONFIG_URI to none and CRDS_S3_ENABLED to false
(no remote configuration), CRDS_MODE to local, CRDS_READONLY_CACHE to 1 and CRDS_CONTEXT to
a placeholder name. Usage:

    python -m benchmarks.jwst_shipped ASN PSFMASK OUTDIR

This prints one JSON line, {"seconds": ..., "products": [...]}. "seconds" is the wall time of
the pipeline run: reading the members, the three steps and writing the products. Imports and
set-up are not included.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SUFFIXES = ("psfstack", "psfalign", "psfsub")
PLACEHOLDER_CONTEXT = "jwst_0000.pmap"


def offline_crds(cache: Path) -> None:
    """Point CRDS and stpipe at a local, server-less cache in ``cache``; call before jwst loads."""
    for name in [name for name in os.environ if name.startswith("CRDS_") and "PATH" in name]:
        del os.environ[name]  # CRDS_PATH_SINGLE, CRDS_CFGPATH, ... would outrank CRDS_PATH
    config = cache / "config" / "jwst"
    config.mkdir(parents=True, exist_ok=True)
    server_config = {
        "observatory": "jwst",
        "operational_context": PLACEHOLDER_CONTEXT,
        "latest_context": PLACEHOLDER_CONTEXT,
        "force_remote_mode": False,
        "bad_files_list": [],
        "last_synced": "never (offline benchmark)",
    }
    (config / "server_config").write_text(repr(server_config))
    os.environ.update(
        {
            "CRDS_PATH": str(cache),
            "CRDS_SERVER_URL": "https://jwst-serverless.stsci.edu",
            "CRDS_CONFIG_URI": "none",
            "CRDS_S3_ENABLED": "false",
            "CRDS_OBSERVATORY": "jwst",
            "CRDS_MODE": "local",
            "CRDS_READONLY_CACHE": "1",
            "CRDS_CONTEXT": PLACEHOLDER_CONTEXT,
            "STPIPE_DISABLE_CRDS_STEPPARS": "true",
        }
    )


def written(outdir: Path) -> dict[Path, int]:
    """The coron3 products in ``outdir``, with their modification times in ns."""
    return {
        path: path.stat().st_mtime_ns
        for suffix in SUFFIXES
        for path in outdir.glob(f"*_{suffix}.fits")
    }


def run(asn: Path, psfmask: Path, outdir: Path) -> tuple[float, list[Path]]:
    """Run Coron3Pipeline on ``asn``. Return the wall time of the run and the new products."""
    with tempfile.TemporaryDirectory(prefix="crds_offline_") as cache:
        offline_crds(Path(cache))
        from jwst.pipeline import Coron3Pipeline

        outdir.mkdir(parents=True, exist_ok=True)
        pipeline = Coron3Pipeline(
            output_dir=str(outdir),
            save_results=True,
            steps={
                "outlier_detection": {"skip": True},
                "resample": {"skip": True},
                "align_refs": {"override_psfmask": str(psfmask.resolve())},
            },
        )
        before = written(outdir)
        start = time.perf_counter()
        pipeline.run(str(asn.resolve()))
        seconds = time.perf_counter() - start
    products = sorted(path for path, mtime in written(outdir).items() if before.get(path) != mtime)
    return seconds, products


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("asn", type=Path, help="coron3 association JSON")
    parser.add_argument("psfmask", type=Path, help="PSFMASK reference file (PsfMaskModel)")
    parser.add_argument("outdir", type=Path, help="folder for the psfstack/psfalign/psfsub")
    args = parser.parse_args(argv)
    seconds, products = run(args.asn, args.psfmask, args.outdir)
    print(json.dumps({"seconds": round(seconds, 3), "products": [str(p) for p in products]}))


if __name__ == "__main__":
    main()
