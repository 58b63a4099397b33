"""The results as one PNG: a panel per workload, a bar per contender (matplotlib, installed
by ``capbus bench --chart`` when missing)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Contender

from .workloads import WORKLOADS


def draw(contenders: list[Contender], workloads: list[str], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from .runner import REFERENCE, figure

    shown = [name for name in workloads if any(c.results.get(name) for c in contenders)]
    columns = 4
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, shown, strict=False):
        workload = WORKLOADS[name]
        measured = [(c, figure(workload, c.results[name])) for c in contenders if c.results.get(name)]
        labels = [c.label for c, _ in measured]
        values = [value for _, value in measured]
        colours = ["tab:red" if c.name == REFERENCE else "tab:gray" for c, _ in measured]
        bars = ax.barh(labels, values, color=colours)
        ax.bar_label(bars, labels=[f"{v:,.{1 if v < 10 else 0}f}" for v in values], fontsize=7, padding=2)
        better = "higher is better" if workload.higher_is_better else "lower is better"
        title = textwrap.fill(workload.label.split(":")[0], 40)
        ax.set_title(f"{title}\n({workload.unit}, {better})", fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(_short))
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
        ax.margins(x=0.25)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _short(value: float, _position: object = None) -> str:
    """An axis label: 120k, not 120000."""
    return f"{value / 1000:g}k" if value >= 10_000 else f"{value:g}"
