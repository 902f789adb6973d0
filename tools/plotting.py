"""Figures: perplexity vs input length (the paper's Figure 1), run comparisons. Headless (Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_extrapolation(records: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Perplexity vs evaluation length, one line per model; each model's training length is
    marked by a dotted vertical line and a star on its curve."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, model in enumerate(dict.fromkeys(r["model"] for r in records)):
        rs = sorted((r for r in records if r["model"] == model), key=lambda r: r["length"])
        color, style = f"C{i}", ["o-", "x--", "s-.", "^:", "v--"][i % 5]  # distinct styles: equal curves stay visible
        train = rs[0]["train_length"]
        ax.plot([r["length"] for r in rs], [r["ppl"] for r in rs], style, color=color, label=f"{model} (L={train})")
        ax.axvline(train, color=color, linestyle=":", alpha=0.7)
        at_train = [r for r in rs if r["length"] == train]
        if at_train:
            ax.plot(train, at_train[0]["ppl"], "*", color=color, markersize=14)
    method = {(r["method"], r["stride"] if r["method"] == "sliding" else None) for r in records}
    desc = ", ".join(m if s is None else f"{m} stride {s}" for m, s in sorted(method, key=str))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or f"Extrapolation ({desc}); dotted line / star = training length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_bars(rows: list[dict], metrics: list[tuple[str, str]], path: str | Path, title: str) -> Path:
    """One bar panel per (key, label) in `metrics`, one bar per row (row["name"])."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    axes = [axes] if len(metrics) == 1 else axes
    names = [r["name"] for r in rows]
    for ax, (key, label) in zip(axes, metrics):
        ax.bar(names, [r[key] or 0 for r in rows], color=[f"C{i}" for i in range(len(rows))])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_curves(series: dict[str, tuple[list[float], list[float]]], path: str | Path, xlabel: str, ylabel: str,
                title: str, hline: float | None = None) -> Path:
    """Line per named series (x, y); optional horizontal target line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", label=f"target {hline:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
