"""`llmstack-eval harness` without the Hugging Face Hub: a task whose dataset must be downloaded
ends with one line naming the task and exit status 2, not a traceback."""

from __future__ import annotations

import sys

from tests.conftest import child_env, run_cmd

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def harness(tmp_path, *args):
    return run_cmd([sys.executable, "-m", "eval", "harness", "--model", "llmstack", *args], cwd=tmp_path,
                   env=child_env(**OFFLINE), check=False, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_task_needing_a_download_is_one_line_and_status_2(eval_model, tmp_path):
    proc = harness(tmp_path, "--model_args", f"checkpoint={eval_model['checkpoint']}", "--tasks", "hellaswag",
                   "--limit", "1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and errors[0] == proc.stderr.rstrip().splitlines()[-1], proc.stderr[-3000:]
    assert "task hellaswag needs the network" in errors[0] and "Hugging Face Hub" in errors[0], errors[0]


def test_missing_checkpoint_is_one_line_and_status_2(tmp_path):
    proc = harness(tmp_path, "--model_args", f"checkpoint={tmp_path / 'missing'}", "--tasks", "hellaswag")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert error_lines(proc.stderr) == [f"error: model not found: {tmp_path / 'missing'}"]


def test_other_errors_are_not_taken_for_offline_tasks():
    """Only a network error raised while a harness task loads its data is reported as one."""
    from eval.harness import _offline_task_error

    assert _offline_task_error(ValueError("bad value"), "hellaswag") is None
    try:
        raise ConnectionError("refused")  # a network error, but not from a task's dataset download
    except ConnectionError as e:
        assert _offline_task_error(e, "hellaswag") is None
