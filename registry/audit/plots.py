"""ROC curves of the attacks, drawn on log-log axes as in the LiRA paper (PNG)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from registry.audit.metrics import Roc, auc


def plot_roc(curves: Mapping[str, Roc], path: Path, title: str = "Membership inference") -> Path:
    """Write one PNG with every attack's ROC curve and the chance diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    floor = 1e-4
    for name, roc in curves.items():
        ax.plot(np.maximum(roc.fpr, floor), np.maximum(roc.tpr, floor),
                label=f"{name} (AUC {auc(roc):.3f})", linewidth=1.5)
    ax.plot([floor, 1], [floor, 1], linestyle="--", color="grey", label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1),
           xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
