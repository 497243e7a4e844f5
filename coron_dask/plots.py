"""Quicklook figures (PNG): what a person looks at first after a run.

matplotlib draws off-screen (Agg); every figure is written to a partial file and renamed,
so a PNG appears whole or not at all.
"""

from pathlib import Path

import numpy as np


def _figure(**options):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(**options)


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    partial = path.with_name(path.name + ".partial.png")
    figure.savefig(partial, dpi=110, bbox_inches="tight")
    plt.close(figure)
    partial.replace(path)
    return path


def contrast_figure(table, path: str | Path) -> Path:
    """The 5σ contrast against separation (arcsec, and λ/D on top), one curve per KL
    cutoff, log scale."""
    figure, axes = _figure(figsize=(6.4, 4.4))
    for cutoff in np.unique(table["kl"]):
        rows = table[table["kl"] == cutoff]
        axes.semilogy(rows["separation"], rows["contrast"], label=f"KL {cutoff}")
    axes.set_xlabel("separation (arcsec)")
    axes.set_ylabel(f"{table.meta.get('significance', 5):g}σ contrast")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="KLIP", fontsize="small")
    per_lambda_d = table.meta["resolution_pixels"] * table.meta["pixel_scale_arcsec"]
    top = axes.secondary_xaxis(
        "top", functions=(lambda s: s / per_lambda_d, lambda n: n * per_lambda_d)
    )
    top.set_xlabel("separation (λ/D)")
    figure.suptitle("contrast curve, calibrated by injection-recovery", fontsize="medium", y=1.02)
    return _save(figure, Path(path))
