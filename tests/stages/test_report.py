"""The quickstart report: a metrics table and PNG curves built from run directories' metrics.jsonl."""

import json

from llmstack.stages.report import read_metrics, series, write_report


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
