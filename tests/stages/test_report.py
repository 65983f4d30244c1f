"""The quickstart report: a metrics table and PNG curves built from run directories' metrics.jsonl."""

import json

from llmstack.stages.quickstart import eval_notes
from llmstack.stages.report import chance_level, plot_panels, read_metrics, series, write_report


def write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_series_skips_rows_without_the_key(tmp_path):
    write_metrics(tmp_path / "r", [{"step": 1, "loss": 3.0}, {"step": 2, "val_loss": 2.5}, {"step": 3, "loss": 2.0}])
    rows = read_metrics(tmp_path / "r")
    assert series(rows, "loss") == ([1, 3], [3.0, 2.0])
    assert series(rows, "val_loss") == ([2], [2.5])
    assert series(rows, "reward") == ([], [])


def test_report_has_table_and_valid_pngs(tmp_path):
    write_metrics(tmp_path / "pre", [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 20)] + [{"step": 19, "val_loss": 3.1}])
    write_metrics(tmp_path / "ppo", [{"step": s, "reward": s / 10, "kl": s / 100} for s in range(1, 6)])
    stages = [
        {"name": "pretrain", "run_dir": tmp_path / "pre", "metrics": {"final val loss": 3.1}},
        {"name": "ppo", "run_dir": tmp_path / "ppo", "metrics": {"reward first -> last": "0.1 -> 0.5"}},
        {"name": "eval", "run_dir": None, "metrics": {"demo_mc acc": 0.25}},
    ]
    report = write_report(tmp_path / "out", "demo", ["intro line"], stages)
    text = report.read_text()
    assert "| pretrain | final val loss | 3.1 |" in text
    assert "| ppo | reward first -> last | 0.1 -> 0.5 |" in text
    assert "| eval | demo_mc acc | 0.25 |" in text
    for name in ("pretrain", "ppo"):
        png = tmp_path / "out" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](plots/{name}.png)" in text
    assert not (tmp_path / "out" / "plots" / "eval.png").exists()


def test_plot_panels_are_titled_with_stage_metric_and_unit(tmp_path, monkeypatch):
    rows = [{"step": s, "loss": 3.0 - s / 10, "accuracy": 0.5 + s / 20} for s in range(1, 5)]
    rows.append({"step": 4, "val_loss": 2.6})
    panels = plot_panels("pretrain", rows, {"loss": "loss (nats/token)"})
    assert [(title, keys) for title, _, keys in panels] == [
        ("pretrain: loss (nats/token) vs step", ["loss", "val_loss"]),
        ("pretrain: pairwise accuracy (fraction of pairs) vs step", ["accuracy"]),
    ]
    # the titles are what the saved figure shows
    from matplotlib.figure import Figure

    seen, save = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (seen.extend(ax.get_title() for ax in fig.axes),
                                                                 save(fig, *a, **k)))
    write_metrics(tmp_path / "pre", rows)
    write_report(tmp_path / "out", "demo", [], [{"name": "pretrain", "run_dir": tmp_path / "pre", "metrics": {},
                                                 "plot_labels": {"loss": "loss (nats/token)"}}])
    assert seen == [title for title, _, _ in panels]


def test_chance_level_is_one_over_the_choices_of_each_sample():
    four = {"choices": ["a", "b", "c", "d"]}
    assert chance_level({"samples": [four, four]}) == 0.25
    assert chance_level({"samples": [four, {"choices": ["a", "b"]}]}) == (0.25 + 0.5) / 2
    assert chance_level({"perplexity": 12.0, "samples": [{"loglikelihood": -3.0}]}) is None  # not multiple choice
    assert chance_level({"acc": 0.3}) is None  # no per-sample record


def test_eval_notes_explain_chance_and_perplexity_rising_after_sft():
    def res(ppl):
        return {"tasks": {"ppl:x": {"perplexity": ppl}}}

    notes = eval_notes({"pretrain": res(280.0), "sft": res(630.0), "ppo": res(660.0), "dpo": res(700.0)},
                       "ppl:x", {"demo_mc": 0.25})
    assert any("Chance level of demo_mc" in n and "0.250" in n for n in notes)
    rise = [n for n in notes if "rises after SFT" in n]
    assert len(rise) == 1 and "280.0 -> 630.0" in rise[0]
    assert "another distribution" in rise[0] and "not a regression" in rise[0]
    # no claim of a rise that did not happen
    notes = eval_notes({"pretrain": res(300.0), "sft": res(290.0), "ppo": res(1.0), "dpo": res(1.0)}, "ppl:x", {})
    assert not any("rises" in n for n in notes)
