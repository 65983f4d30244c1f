"""Task records (prompt + reference for a verifier) and the builtin arithmetic task."""

from __future__ import annotations

import json

import pytest

from data_pipeline import builtin, formats
from data_pipeline.errors import DataError, ErrorLog


def write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_task_records_with_and_without_the_reference(tmp_path):
    path = write(tmp_path / "t.jsonl", [
        {"prompt": "What is 2 + 2?", "answer": "4"},
        {"prompt": "Add.", "system": "Be brief.", "answer": 5},
        {"messages": [{"role": "user", "content": "3 * 3?"}, {"role": "assistant", "content": "9"}],
         "answer": "9"},
        {"prompt": "No reference here"},
        "{not json",
        {"question": "wrong field", "answer": "1"},
        {"prompt": "tests", "tests": ["assert f(1) == 2"]},
    ])
    log = ErrorLog()
    got = [(m, r) for _, m, r in formats.iter_task_records(path, errors=log)]
    assert got == [
        ([{"role": "user", "content": "What is 2 + 2?"}], "4"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add."}], 5),
        ([{"role": "user", "content": "3 * 3?"}], "9"),  # the trailing assistant turn is dropped
        ([{"role": "user", "content": "No reference here"}], None),
        ([{"role": "user", "content": "tests"}], None),
    ]
    assert log.counts() == {path: {"malformed_json": 1, "missing_field": 1}}
    # another reference field; the records are the same
    refs = [r for _, _, r in formats.iter_task_records(path, reference_field="tests")]
    assert refs == [None, None, None, None, ["assert f(1) == 2"]]
    # the prompts are exactly what the PPO prompt reader gives
    assert [m for m, _ in got] == [m for _, m in formats.iter_prompt_records(path)]
    # where: file and position of each record
    assert all(w.startswith(path) for w, _, _ in formats.iter_task_records(path))


def test_task_records_fail_names_file_and_line(tmp_path):
    path = write(tmp_path / "t.jsonl", [{"prompt": "ok", "answer": "1"}, "{not json"])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        list(formats.iter_task_records(path, on_error="fail"))


def test_builtin_arith_splits_are_disjoint_deterministic_and_correct():
    train, val = list(builtin.builtin_arith_tasks("train")), list(builtin.builtin_arith_tasks("validation"))
    assert 3000 <= len(train) <= 5000 and 150 <= len(val) <= 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert len({r["prompt"] for r in train}) == len(train)
    assert list(builtin.builtin_arith_tasks("train")) == train  # same order every time
    for r in train + val:
        assert r["prompt"] == f"What is {r['expression']}?"
        assert r["answer"] == r["response"] == str(eval(r["expression"]))  # digits, + - * and spaces only
        assert all(t.isdigit() and len(t) == 1 or t in "+-*" for t in r["expression"].split())
    assert {op for r in train for op in "+-*" if f" {op} " in r["expression"]} == {"+", "-", "*"}
    with pytest.raises(ValueError, match="allowed: train, validation"):
        list(builtin.builtin_arith_tasks("test"))


def test_builtin_arith_specs_read_through_every_record_reader():
    val = list(builtin.builtin_arith_tasks("validation"))
    tasks = list(formats.iter_task_records("builtin-arith:validation", on_error="fail"))
    assert [(m, ref) for _, m, ref in tasks] == [([{"role": "user", "content": r["prompt"]}], r["answer"]) for r in val]
    assert [m for _, m in formats.iter_prompt_records("builtin-arith:validation")] == [m for _, m, _ in tasks]
    # an SFT source too (prompt + response)
    chats = list(formats.iter_chat_records("builtin-arith:validation", on_error="fail"))
    assert chats[0][1] == [{"role": "user", "content": val[0]["prompt"]},
                           {"role": "assistant", "content": val[0]["answer"]}]
    assert sum(1 for _ in formats.iter_task_records("builtin-arith")) == len(list(builtin.builtin_arith_tasks("train")))
    with pytest.raises(ValueError, match="unknown split 'test'"):
        list(formats.iter_task_records("builtin-arith:test"))
