"""Verifiable rewards: number extraction rules, tolerance and format bonus, regex checks, and program
tests run in limited subprocesses (pass, fail, crash, hang, memory bomb, early exit, parallel)."""

from __future__ import annotations

import os
import time

import pytest

from llmstack.rlhf import verifiers as V


def num(text, rule="last_number"):
    got = V.extract_number(text, rule)
    return None if got is None else float(got)


@pytest.mark.parametrize("text, rule, expected", [
    ("The answer is 7.", "last_number", 7),
    ("3 + 4 = 7, so 7", "last_number", 7),
    ("it is -4", "last_number", -4),
    ("x = -4.5 or so", "last_number", -4.5),
    ("\u22123", "last_number", -3),  # the Unicode minus sign
    ("3-4", "last_number", 4),  # a binary minus, not a sign
    ("costs $1,234 in total", "last_number", 1234),
    ("1,234,567.25", "last_number", 1234567.25),
    ("1,2345", "last_number", 2345),  # not a thousands separator
    ("pi is 3.14.15", "last_number", 3.14),
    ("no digits here", "last_number", None),
    ("first 12 then -3", "first_number", 12),
    ("-0.5 and 2", "first_number", -0.5),
    ("so \\boxed{12} and then 3", "boxed", 12),
    ("\\boxed{1} ... \\boxed{-1,000}", "boxed", -1000),  # the last box
    ("\\boxed{12 \\text{ apples}}", "boxed", 12),
    ("\\boxed{\\frac{1}{2}}", "boxed", None),  # two numbers: not one answer
    ("\\boxed{12", "boxed", None),  # unclosed
    ("12 with no box", "boxed", None),
    ("so 5 * 8 = 40\n#### 42 then 7", "after:####", 42),
    ("####-3", "after:####", -3),
    ("Answer: 8 (not 9)", "after:Answer:", 8),
    ("42 but no marker", "after:####", None),
    ("#### none", "after:####", None),
])
def test_extraction_rules(text, rule, expected):
    assert num(text, rule) == expected


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="allowed last_number"):
        V.extract_number("1", "median")
    with pytest.raises(ValueError, match="after:"):
        V.numeric_answer(["q"], ["1"], ["1"], extract="after:")


def test_numeric_answer_references_tolerance_and_bonus():
    prompts = ["q"] * 6
    responses = ["7", "The answer is 7.0", "1,234", "8", "no idea", "3.3"]
    refs = [7, "7", "1234", 7.0, 7, "3.25"]
    assert V.numeric_answer(prompts, responses, refs) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert V.numeric_answer(prompts, responses, refs, tolerance=0.05) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    # the bonus goes to every response the rule can read, right or wrong; none to "no idea"
    assert V.numeric_answer(prompts, responses, refs, format_bonus=0.1) == [1.1, 1.1, 1.1, 0.1, 0.0, 0.1]
    # exact for integers beyond float precision
    assert V.numeric_answer(["q", "q"], ["9007199254740993", "9007199254740992"], [2**53 + 1] * 2) == [1.0, 0.0]


def test_numeric_answer_rules_and_reference_extraction():
    assert V.numeric_answer(["q"] * 2, ["\\boxed{12} so 13", "12"], [12, 12], extract="boxed") == [1.0, 0.0]
    gsm = "Natalia sold 48 / 2 = 24 clips in May.\n#### 72"
    assert V.numeric_answer(["q"] * 2, ["48 + 24 = 72\n#### 72", "#### 24"], [gsm, gsm], extract="after:####",
                            reference_extract="after:####") == [1.0, 0.0]


@pytest.mark.parametrize("ref", [None, "", "seven", "nan", float("inf"), True, [7]])
def test_bad_reference_names_the_prompt(ref):
    with pytest.raises(ValueError, match="reference of prompt 1 "):
        V.numeric_answer(["a", "b"], ["7", "7"], [7, ref])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 2 references"):
        V.numeric_answer(["a", "b"], ["1"], [1, 1])


def test_regex_format_search_full_and_bad_pattern():
    responses = ["<answer>7</answer>", "it is <answer>7</answer>.", "<answer>\n7\n</answer>", "7"]
    refs = [None] * 4
    assert V.regex_format([""] * 4, responses, refs, pattern=r"<answer>\d+</answer>") == [1.0, 1.0, 0.0, 0.0]
    assert V.regex_format([""] * 4, responses, refs, pattern=r"<answer>\d+</answer>", full=True) == [1, 0, 0, 0]
    assert V.regex_format([""] * 4, responses, refs, pattern=r"(?s)<answer>\s*\d+\s*</answer>", full=True) == \
        [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"bad pattern '\(unclosed'"):
        V.regex_format(["q"], ["r"], [None], pattern="(unclosed")


def test_combined_weights_parts():
    got = V.combined(["q"] * 3, ["<a>7</a>", "7", "<a>8</a>"], [7, 7, 7], parts=[
        {"fn": "numeric_answer", "weight": 1.0}, {"fn": "regex_format", "weight": 0.5, "pattern": r"^<a>.*</a>$"}])
    assert got == [1.5, 1.0, 0.5]
    with pytest.raises(ValueError, match="parts\\[0\\].fn is 'nope'"):
        V.combined(["q"], ["7"], [7], parts=[{"fn": "nope"}])


# --- program tests ---

TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


def run(responses, tests=TESTS, **kw):
    kw.setdefault("timeout_s", 5.0)
    return V.program_tests(["q"] * len(responses), responses, [tests] * len(responses), **kw)


def test_extract_code_fences():
    assert V.extract_code("Here:\n```python\ndef f(): pass\n```\nand ```python\nx\n```") == "def f(): pass\n"
    assert V.extract_code("```\nplain\n```\n```py\nchosen\n```") == "chosen\n"  # a python block wins
    assert V.extract_code("```\nplain\n```") == "plain\n"
    assert V.extract_code("```python\ncut off at max tokens") == "cut off at max tokens"
    assert V.extract_code("def f(): pass") == "def f(): pass"


def test_pass_fail_crash_and_fenced_code():
    good = "def add(a, b):\n    return a + b"
    fenced = "Sure, here it is:\n```python\n" + good + "\n```\nThis adds two numbers."
    responses = [good, fenced, "def add(a, b):\n    return a - b", "def add(a, b) return a + b",
                 "raise RuntimeError('no')", "", "Sure, here it is: " + good]
    assert run(responses) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # tests as a list of asserts, and HumanEval-style check(candidate) with entry
    assert V.program_tests(["q"], [good], [["assert add(1, 2) == 3", "assert add(0, 0) == 0"]]) == [1.0]
    check = "def check(candidate):\n    assert candidate(2, 3) == 5"
    assert V.program_tests(["q", "q"], [good, "def add(a, b): return 0"], [check, check], entry="add") == [1.0, 0.0]


def test_exiting_before_the_tests_is_not_a_pass():
    responses = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"]
    assert run(responses) == [0.0, 0.0, 0.0]


def test_environment_is_stripped_and_cwd_is_fresh(monkeypatch):
    monkeypatch.setenv("LLMSTACK_SECRET_FOR_TEST", "x")
    code = ("import os\nassert 'LLMSTACK_SECRET_FOR_TEST' not in os.environ\n"
            "assert set(os.listdir('.')) == {'program.py'}\nassert os.getcwd() != " + repr(os.getcwd()))
    assert V.program_tests(["q"], [code], ["assert True"]) == [1.0]


def test_infinite_loop_is_killed_within_the_timeout():
    t0 = time.perf_counter()
    assert run(["while True:\n    pass"], timeout_s=1) == [0.0]
    assert time.perf_counter() - t0 < 5


def test_children_of_a_timed_out_program_are_killed(tmp_path):
    pid_file = tmp_path / "pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(60)")
    assert run([code], timeout_s=2) == [0.0]
    pid = int(pid_file.read_text())
    deadline = time.time() + 3
    while time.time() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped yet
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("bomb", ["x = bytearray(512 << 20)",
                                  "xs = []\nwhile True:\n    xs.append(bytearray(1 << 20))"])
def test_memory_bomb_is_stopped(bomb):
    add = "\ndef add(a, b):\n    return a + b"
    t0 = time.perf_counter()
    assert run([bomb + add], timeout_s=3, memory_mb=256) == [0.0]
    assert time.perf_counter() - t0 < 5
    # the same program without the bomb passes under the same limit, and 512 MiB fit in 1 GiB
    assert run([add], timeout_s=3, memory_mb=256) == [1.0]
    assert run(["x = bytearray(512 << 20)" + add], timeout_s=3, memory_mb=1024) == [1.0]


def test_completions_run_in_parallel_and_keep_their_order(monkeypatch):
    monkeypatch.setattr(V.os, "cpu_count", lambda: 4)
    slow_good = "import time\ntime.sleep(1)\ndef add(a, b):\n    return a + b"
    slow_bad = "import time\ntime.sleep(1)\ndef add(a, b):\n    return a * b"
    t0 = time.perf_counter()
    assert run([slow_good, slow_bad, slow_good, slow_bad]) == [1.0, 0.0, 1.0, 0.0]
    assert time.perf_counter() - t0 < 3.5  # one at a time takes over 4 s


def test_bad_program_tests_arguments():
    with pytest.raises(ValueError, match="reference of prompt 0 is None"):
        V.program_tests(["q"], ["x = 1"], [None])
    with pytest.raises(ValueError, match="entry must be a function name"):
        V.program_tests(["q"], ["x = 1"], ["assert x"], entry="f()")


def test_sys_executable_runs_isolated():
    # the child is `python -I`: no user site, no PYTHON* variables, no script directory on sys.path
    code = "import sys\nassert sys.flags.isolated == 1"
    assert V.program_tests(["q"], [code], ["assert True"]) == [1.0]
