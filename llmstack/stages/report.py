"""The quickstart's report: a table of each stage's metrics and PNG plots of its curves.

Every stage writes `run.dir/metrics.jsonl` (one JSON object per logged step); the plots are made
from those files alone, so the report can be rebuilt from the run directories at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

# Curves worth plotting: (panel, metric keys, what the panel shows with its unit). A stage's figure
# has one panel per group that its metrics.jsonl holds; a stage may say more precisely what its
# panel shows (write_report's "plot_labels": {panel: label}), e.g. which loss and per what.
PANELS: list[tuple[str, tuple[str, ...], str]] = [
    ("loss", ("loss", "val_loss"), "loss"),
    ("reward", ("reward", "val_reward", "reward_mean"), "reward"),
    ("kl", ("kl",), "KL to reference (nats/response)"),
    ("accuracy", ("accuracy", "val_accuracy"), "pairwise accuracy (fraction of pairs)"),
    ("margin", ("margin", "val_margin"), "reward margin, chosen - rejected"),
]
# Legend names of the curves: training-step values and held-out (validation) values.
CURVES = {"loss": "training", "val_loss": "held-out", "reward": "rollouts", "val_reward": "held-out",
          "reward_mean": "rollouts", "kl": "rollouts", "accuracy": "training batches", "val_accuracy": "held-out",
          "margin": "training batches", "val_margin": "held-out"}


def chance_level(task_result: dict) -> float | None:
    """Accuracy of guessing uniformly at random on a multiple-choice task: the mean over its samples
    of 1 / (number of choices), from the per-sample results (`llmstack-eval --log-samples`); None
    for a task without choices or without logged samples."""
    samples = [s for s in task_result.get("samples") or [] if s.get("choices")]
    if not samples:
        return None
    return sum(1 / len(s["choices"]) for s in samples) / len(samples)


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


def plot_panels(name: str, rows: list[dict], labels: dict[str, str] | None = None) -> list[tuple[str, str, list[str]]]:
    """(title "stage: what (unit) vs step", y-axis label, metric keys) of each panel `rows` has data for."""
    labels = labels or {}
    panels = []
    for panel, keys, default in PANELS:
        present = [k for k in keys if series(rows, k)[0]]
        if present:
            what = labels.get(panel, default)
            panels.append((f"{name}: {what} vs step", what, present))
    return panels


def plot_stage(name: str, rows: list[dict], out: Path, labels: dict[str, str] | None = None) -> Path | None:
    """One PNG with a panel per metric group present in `rows`, each titled with what it shows
    (`labels` overrides PANELS' descriptions per panel); None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    panels = plot_panels(name, rows, labels)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, ylabel, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = series(rows, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, markersize=3, label=f"{CURVES.get(key, key)} ({key})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
    "notes": [lines], "plot_labels": {panel: what the panel shows}}; plots go to
    out_dir/plots/<name>.png."""
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
            png = plot_stage(stage["name"], read_metrics(stage["run_dir"]), out_dir / "plots" / f"{stage['name']}.png",
                             stage.get("plot_labels"))
        if png is None and not extra:
            continue
        lines += [f"## {stage['name']}", ""]
        if png is not None:
            lines += [f"![{stage['name']}](plots/{png.name})", ""]
        for note in extra:  # each its own paragraph
            lines += [note, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
