"""Local task data that cannot be read (malformed JSON / JSONL, invalid UTF-8, a non-object
document) is one message naming the task and file:line, exit 2; it was a traceback."""

from __future__ import annotations

import json
import sys

import pytest

from eval.taskspec import load_spec, load_split
from llmstack.errors import UsageError
from tests.conftest import REPO, run_cmd

MC = "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_target: label\ndoc_to_choice: ['yes', 'no']\n"
GOOD = json.dumps({"q": "x", "label": 0})


def _spec(tmp_path, name: str, data: bytes, kind: str = "json") -> str:
    (tmp_path / name).write_bytes(data)
    spec = tmp_path / "t.yaml"
    spec.write_text(f"task: broken\ndataset_path: {kind}\ndataset_kwargs: {{data_files: {{test: {name}}}}}\n"
                    f"test_split: test\n{MC}")
    return str(spec)


@pytest.mark.parametrize("name,data,kind,expect", [
    ("d.jsonl", f"{GOOD}\n{GOOD}\n{{\"q\": \"x\", \"label\n".encode(), "json", "d.jsonl:3: malformed JSON"),
    ("d.jsonl", f"{GOOD}\n".encode() + b'{"q": "caf\xe9", "label": 0}\n', "json", "d.jsonl:2: invalid UTF-8"),
    ("d.json", f"[\n{GOOD},\n{GOOD},\n{{\"q\": }}\n]\n".encode(), "json", "d.json:4: malformed JSON"),
    ("d.json", f"[{GOOD}, 3]".encode(), "json", "element 1 of the array is not a JSON object"),
    ("d.jsonl", f"{GOOD}\n[1, 2]\n".encode(), "json", "d.jsonl:2: expected a JSON object per line"),
    ("d.csv", b"q,label\nx,0\ncaf\xe9,1\n", "csv", "d.csv:3: invalid UTF-8"),
])
def test_unreadable_task_data_names_file_and_line(tmp_path, name, data, kind, expect):
    spec, base = load_spec(_spec(tmp_path, name, data, kind))
    with pytest.raises(UsageError) as e:
        load_split(spec, "test", base.parent)
    assert "task broken" in str(e.value) and expect in str(e.value), str(e.value)


def test_a_json_string_may_hold_a_line_separator(tmp_path):
    """U+2028 is valid unescaped inside a JSON string; JSONL lines end at newlines only."""
    row = json.dumps({"q": "a\u2028b", "label": 0}, ensure_ascii=False)
    spec, base = load_spec(_spec(tmp_path, "d.jsonl", (row + "\n").encode()))
    assert load_split(spec, "test", base.parent) == [{"q": "a\u2028b", "label": 0}]


def test_cli_malformed_task_data_exits_2(eval_model, tmp_path):
    spec = _spec(tmp_path, "d.jsonl", f"{GOOD}\n".encode() + b"\xff\xfe{\n")
    proc = run_cmd([sys.executable, "-m", "eval", "--model", str(eval_model["hf"]), "--tasks", spec], cwd=REPO,
                   check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "d.jsonl:2: invalid UTF-8" in proc.stderr
