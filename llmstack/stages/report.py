"""The quickstart's report: a table of each stage's metrics and PNG plots of its curves.

Every stage writes `run.dir/metrics.jsonl` (one JSON object per logged step); the plots are made
from those files alone, so the report can be rebuilt from the run directories at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

# Curves worth plotting, per metric key, with the axis label they get. A stage's figure has one
# panel per key group that its metrics.jsonl holds.
PANELS: list[tuple[str, tuple[str, ...]]] = [
    ("loss", ("loss", "val_loss")),
    ("reward", ("reward", "val_reward", "reward_mean")),
    ("KL to reference", ("kl",)),
    ("pairwise accuracy", ("accuracy", "val_accuracy")),
    ("reward margin", ("margin", "val_margin")),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric; rows without it are skipped."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and "step" in row:
            xs.append(row["step"])
            ys.append(float(value))
    return xs, ys


def plot_stage(name: str, rows: list[dict], out: Path) -> Path | None:
    """One PNG with a panel per metric group present in `rows`; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    panels = [(label, [k for k in keys if series(rows, k)[0]]) for label, keys in PANELS]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (label, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = series(rows, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(name)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(out_dir: Path, title: str, intro: list[str], stages: list[dict]) -> Path:
    """report.md in out_dir: `stages` is a list of {"name", "run_dir", "metrics": {label: value},
    "notes": [lines]}; plots go to out_dir/plots/<name>.png."""
    out_dir = Path(out_dir)
    lines = [f"# {title}", "", *intro, "", "| stage | metric | value |", "|---|---|---|"]
    for stage in stages:
        for label, value in stage["metrics"].items():
            lines.append(f"| {stage['name']} | {label} | {fmt(value)} |")
    lines.append("")
    for stage in stages:
        extra = stage.get("notes") or []
        png = None
        if stage.get("run_dir"):
            png = plot_stage(stage["name"], read_metrics(stage["run_dir"]), out_dir / "plots" / f"{stage['name']}.png")
        if png is None and not extra:
            continue
        lines += [f"## {stage['name']}", ""]
        if png is not None:
            lines += [f"![{stage['name']}](plots/{png.name})", ""]
        lines += [*extra, ""] if extra else []
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
