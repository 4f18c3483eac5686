"""The sensitivity plot (matplotlib, an optional extra): damage by ratio per unit, and damage by MACs kept."""

from __future__ import annotations

import io
from typing import Optional

__all__ = ["plot_png", "have_matplotlib"]

# Units drawn with a label; the rest are thin grey lines (a ResNet-50 has dozens of groups).
_LABELLED = 10


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_png(report: dict) -> Optional[bytes]:
    """PNG bytes of the plot, or None when matplotlib is not installed."""
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    units = report["units"]
    worst = sorted(units, key=lambda u: -max(e["damage"] for e in u["entries"]))[:_LABELLED]
    labelled = {u["name"] for u in worst}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    macs0 = report["original"].get("macs")
    for unit in units:
        ratios = [e["ratio"] for e in unit["entries"]]
        damage = [e["damage"] for e in unit["entries"]]
        style = dict(lw=1.6, marker="o", ms=3) if unit["name"] in labelled else dict(lw=0.6, color="0.7")
        label = unit["name"] if unit["name"] in labelled else None
        left.plot(ratios, damage, label=label, **style)
        if macs0:
            kept = [e["macs"] / macs0 if e.get("macs") is not None else None for e in unit["entries"]]
            pts = [(k, d) for k, d in zip(kept, damage) if k is not None]
            right.plot([p[0] for p in pts], [p[1] for p in pts], **style)
    left.set_xlabel("ratio of the unit's channels pruned (unit alone)")
    left.set_ylabel(f"damage ({report['metric']})")
    left.set_title(f"sensitivity by {report['by']}")
    if labelled:
        left.legend(fontsize=7, loc="upper left")
    right.set_xlabel("fraction of the original MACs kept")
    right.set_ylabel("damage")
    right.set_title("damage against MACs (each unit alone)")
    right.invert_xaxis()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
