"""Plots people would rather look at than read: singular-value spectra per layer."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .decompose import SiteSpectrum  # noqa: E402


def plot_spectra(spectra: list[SiteSpectrum], out: str | Path, *, title: str = "") -> Path:
    """One row of panels per attention stack, Q-K and V-O side by side; one line per layer (mean over heads)."""
    stacks = list(dict.fromkeys(s.stack for s in spectra))
    fig, axes = plt.subplots(len(stacks), 2, figsize=(11, 3.6 * len(stacks)), squeeze=False)
    for row, stack in enumerate(stacks):
        sites = [s for s in spectra if s.stack == stack]
        cmap = plt.get_cmap("viridis", max(2, len(sites)))
        for col, pair in enumerate(("qk", "vo")):
            ax = axes[row][col]
            label = "Q-K" if pair == "qk" else "V-O"
            for i, site in enumerate(sites):
                values = getattr(site, pair)
                if values is None:  # Q-K blocked (RoPE, QK-norm): W_q's per-head spectrum, clearly labelled
                    values, label = site.q, "W_q per head (no Q-K merge: RoPE or QK-norm)"
                ax.semilogy(
                    values.mean(0).clamp_min(1e-12).numpy(), color=cmap(i), lw=1.2, label=f"layer {site.layer_index}"
                )
            ax.set_title(f"{stack}: {label}")
            ax.set_xlabel("dim (sorted)")
            ax.set_ylabel("singular value (mean over heads)")
            ax.grid(alpha=0.3, which="both")
        if len(sites) <= 12:
            axes[row][1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and renamed over it: an interrupted save leaves no half-written image
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}{out.suffix}")
    try:
        fig.savefig(partial, dpi=110)
        os.replace(partial, out)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
    return out
