"""Verifiable rewards for `llmstack grpo reward.function=llmstack.rlhf.verifiers:NAME`.

A verifier takes the prompts (the last user message of each conversation), the decoded responses
(stop token removed) and one reference per prompt (the record's `data.reference_field`: an answer,
test code, or None), plus the keyword arguments of `reward.kwargs`, and returns one float per
response. Any importable `module:function` with that signature works.

Design choices:
- A wrong or unparseable response is a reward (0.0), never an exception: a policy writes anything.
  A bad *task* (a missing reference, an unknown extraction rule, a bad pattern) is a ValueError that
  names it, because no amount of training fixes it.
- Numbers are compared as decimals (1,234 == 1234.0), so large integers are exact and "7.0" equals 7.
- `format_bonus` rewards a response the extraction rule can read at all: with a tiny model the
  correct answer is rare at first, and a well-formed answer is the step before it (DeepSeek-R1's
  format reward, used here as a small additive term).
- Program tests run each completion in its own Python process with resource limits, in parallel
  from a small thread pool (the work is in the children, so threads suffice). The limits are set by
  a bootstrap inside the child rather than a `preexec_fn`, which is unsafe in a process with threads
  (a training process has many). A completion passes only if the test code ran to its end: the
  bootstrap then writes a per-run nonce that the program never sees, so `sys.exit(0)` or
  `os._exit(0)` before the asserts is a failure, not a pass.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

# A number: optional minus (only where it cannot be a binary minus: not right after a word character,
# a closing bracket or a dot), digits with optional thousands separators (1,234,567), optional decimals.
# "3-4" holds 3 and 4; "x = -4" holds -4; "3.14.15" holds 3.14 only; "1,2345" holds 1 and 2345.
_NUMBER = re.compile(r"(?:(?<![\w)\].])[-\u2212])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
EXTRACT_RULES = ("last_number", "first_number", "boxed", "after:<marker>")


def _to_decimal(text: str) -> Decimal:
    return Decimal(text.replace(",", "").replace("\u2212", "-"))


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed


def _check_rule(extract: str) -> None:
    if extract in ("last_number", "first_number", "boxed"):
        return
    if extract.startswith("after:") and extract[len("after:"):]:
        return
    raise ValueError(f"extract={extract!r}: allowed {', '.join(EXTRACT_RULES)} (e.g. 'after:####')")


def extract_number(text: str, extract: str = "last_number") -> Decimal | None:
    """The number `text` answers under an extraction rule, or None.

    last_number / first_number: the last / first number anywhere; boxed: the number inside the last
    \\boxed{...} when it holds exactly one (\\boxed{\\frac{1}{2}} holds none); after:MARKER: the first
    number after the first occurrence of MARKER ("after:####" for GSM8K-style answers).
    """
    _check_rule(extract)
    if extract == "boxed":
        content = _boxed(text)
        found = _NUMBER.findall(content) if content is not None else []
        return _to_decimal(found[0]) if len(found) == 1 else None
    if extract.startswith("after:"):
        marker = extract[len("after:"):]
        at = text.find(marker)
        if at < 0:
            return None
        text, extract = text[at + len(marker):], "first_number"
    if extract == "first_number":
        m = _NUMBER.search(text)
        return _to_decimal(m.group()) if m else None
    found = _NUMBER.findall(text)
    return _to_decimal(found[-1]) if found else None


def _reference_number(ref: Any, i: int, extract: str | None) -> Decimal:
    """A reference as a decimal; ValueError naming prompt `i` when it is missing or not a number."""
    value: Decimal | None = None
    if isinstance(ref, bool) or ref is None:
        value = None
    elif isinstance(ref, int):
        value = Decimal(ref)
    elif isinstance(ref, float):
        value = Decimal(repr(ref)) if math.isfinite(ref) else None
    elif isinstance(ref, str):
        if extract is not None:
            value = extract_number(ref, extract)
        else:
            try:
                value = _to_decimal(ref.strip())
            except InvalidOperation:
                value = None
    if value is None or not value.is_finite():
        raise ValueError(f"reference of prompt {i} is {ref!r}: numeric_answer needs a number (int, float or a "
                         "string such as '42' or '1,234.5')" + ("" if extract is None else f" that {extract} finds"))
    return value


def numeric_answer(prompts: list[str], responses: list[str], references: list, extract: str = "last_number",
                   tolerance: float = 0.0, format_bonus: float = 0.0,
                   reference_extract: str | None = None) -> list[float]:
    """1.0 when the number the response answers (see :func:`extract_number`) equals the reference
    within `tolerance` (absolute), else 0.0; plus `format_bonus` whenever the rule finds a number.

    References are numbers or numeric strings; `reference_extract` reads them with an extraction rule
    instead (e.g. "after:####" on GSM8K's worked answers). A missing or unparseable reference is a
    ValueError naming the prompt index.
    """
    _check_lengths(prompts, responses, references)
    _check_rule(extract)
    if reference_extract is not None:
        _check_rule(reference_extract)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    refs = [_reference_number(r, i, reference_extract) for i, r in enumerate(references)]
    tol = Decimal(repr(float(tolerance)))
    out = []
    for response, ref in zip(responses, refs):
        got = extract_number(response, extract)
        if got is None:
            out.append(0.0)
        else:
            out.append((1.0 if abs(got - ref) <= tol else 0.0) + format_bonus)
    return out


def regex_format(prompts: list[str], responses: list[str], references: list, pattern: str,
                 full: bool = False) -> list[float]:
    """1.0 when `pattern` matches the response (re.search; re.fullmatch with full=True), else 0.0.

    Flags go inline, e.g. "(?s)<think>.*</think>" for a dot that spans lines. A pattern that does not
    compile is a ValueError naming it.
    """
    _check_lengths(prompts, responses, references)
    try:
        rx = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise ValueError(f"regex_format: bad pattern {pattern!r}: {e}") from None
    match = rx.fullmatch if full else rx.search
    return [1.0 if match(r) else 0.0 for r in responses]


# ---------------------------------------------------------------------------------------------
# Program tests

_FENCED = re.compile(r"```[ \t]*(python3?|py)?[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)

# Runs in the child: limits first (soft = hard, so the program cannot raise them), then the program,
# then the nonce (read from stdin before the program starts, kept in a local the program's globals do
# not reach) into a file, only if the program returned normally. Exceptions and SystemExit propagate:
# a traceback and a non-zero status.
_BOOTSTRAP = """\
import os, resource, sys
def _limit(which, value):
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))
def _main():
    nonce = sys.stdin.readline().strip()
    _limit(resource.RLIMIT_AS, {memory})
    _limit(resource.RLIMIT_CPU, {cpu})
    _limit(resource.RLIMIT_FSIZE, {fsize})
    _limit(resource.RLIMIT_CORE, 0)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    sys.argv = ["program.py"]
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {{"__name__": "__main__", "__file__": "program.py"}})
    with open({done!r}, "w") as f:
        f.write(nonce)
_main()
"""
_DONE = "done"
_FSIZE_MB = 64


def extract_code(response: str) -> str:
    """The content of the first ```python (or ```py) fenced block, else of the first bare ``` block,
    else the whole response. An unclosed fence (a completion cut off at max_new_tokens) runs to the end."""
    blocks = [(m.group(1), m.group(2)) for m in _FENCED.finditer(response)]
    for lang, body in blocks:
        if lang:
            return body
    for lang, body in blocks:
        if not lang:
            return body
    return response


def run_program(source: str, timeout_s: float = 5.0, memory_mb: int = 512) -> bool:
    """True when `source` runs to its end with exit status 0 within the limits, else False.

    The program runs as `python -I` in a fresh temporary directory (its cwd, removed afterwards) with an
    environment of PATH and LANG only, stdin/stdout/stderr discarded, RLIMIT_AS = memory_mb MiB (address
    space: raise it for code that imports numpy and the like), RLIMIT_CPU = timeout_s rounded up + 1 s,
    files up to 64 MiB, in its own session; after `timeout_s` of wall-clock time the whole process group
    is killed. This is process isolation with limits, NOT a security sandbox: the program can read and
    write any file the user can, use the network, and start processes. Run only trusted tasks' tests on
    completions of a model you control.
    """
    nonce = secrets.token_hex(16)
    cpu = int(math.ceil(timeout_s)) + 1
    boot = _BOOTSTRAP.format(memory=int(memory_mb) << 20, cpu=cpu, fsize=_FSIZE_MB << 20, done=_DONE)
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": os.environ.get("LANG", "C.UTF-8")}
    with tempfile.TemporaryDirectory(prefix="verify-", ignore_cleanup_errors=True) as cwd:
        with open(os.path.join(cwd, "program.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(source)
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", boot], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            return False
        try:
            proc.communicate((nonce + "\n").encode(), timeout=timeout_s)
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        finally:
            _kill_group(proc)  # also the program's own children, whether it finished or not
            proc.communicate()  # reaps it and closes the pipe
        if not ok:
            return False
        try:
            with open(os.path.join(cwd, _DONE), encoding="utf-8") as f:
                return f.read() == nonce
        except (OSError, UnicodeDecodeError):
            return False


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def program_tests(prompts: list[str], responses: list[str], references: list, timeout_s: float = 5.0,
                  memory_mb: int = 512, entry: str | None = None) -> list[float]:
    """1.0 when the response's Python code passes the reference tests, else 0.0.

    The code is :func:`extract_code` of the response; the reference is test code (a string of asserts,
    or a list of them). `code + "\\n" + tests` runs in a subprocess (:func:`run_program`: wall-clock
    `timeout_s`, `memory_mb` of address space) and passes when it exits with status 0 after the last
    test. With `entry` (a function name) the tests are HumanEval-style, defining `check(candidate)`,
    and `check(<entry>)` is appended. Bad code is a reward of 0, never an exception; a missing
    reference is a ValueError naming the prompt index. Completions run in parallel, min(4, CPUs) at a
    time. This is process isolation with limits, not a security sandbox (no network or filesystem
    isolation beyond a temporary cwd): use it only for trusted tasks.
    """
    _check_lengths(prompts, responses, references)
    if not timeout_s > 0 or memory_mb <= 0:
        raise ValueError(f"program_tests needs timeout_s > 0 and memory_mb > 0, got {timeout_s}, {memory_mb}")
    if entry is not None and not entry.isidentifier():
        raise ValueError(f"entry must be a function name, got {entry!r}")
    sources = []
    for i, ref in enumerate(references):
        if isinstance(ref, (list, tuple)) and all(isinstance(t, str) for t in ref):
            ref = "\n".join(ref)
        if not isinstance(ref, str) or not ref.strip():
            raise ValueError(f"reference of prompt {i} is {ref!r}: program_tests needs test code (a string of "
                             "asserts or a list of them)")
        tail = f"\ncheck({entry})\n" if entry else "\n"
        sources.append(extract_code(responses[i]) + "\n" + ref + tail)

    def one(src: str) -> float:
        return 1.0 if run_program(src, timeout_s, memory_mb) else 0.0

    if len(sources) <= 1:
        return [one(s) for s in sources]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1, len(sources))) as pool:
        return list(pool.map(one, sources))


# ---------------------------------------------------------------------------------------------

VERIFIERS: dict[str, Callable[..., list[float]]] = {
    "numeric_answer": numeric_answer, "regex_format": regex_format, "program_tests": program_tests}


def combined(prompts: list[str], responses: list[str], references: list, parts: list[dict]) -> list[float]:
    """Weighted sum of built-in verifiers: parts = [{"fn": "numeric_answer", "weight": 1.0, **kwargs}, ...]
    (weight defaults to 1.0; the other keys are the verifier's keyword arguments)."""
    _check_lengths(prompts, responses, references)
    if not isinstance(parts, list) or not parts:
        raise ValueError("combined needs parts: a non-empty list of {'fn': NAME, 'weight': W, ...kwargs}")
    total = [0.0] * len(responses)
    for k, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("fn") not in VERIFIERS:
            got = part.get("fn") if isinstance(part, dict) else part
            raise ValueError(f"combined: parts[{k}].fn is {got!r}; allowed: {', '.join(VERIFIERS)}")
        kwargs = {key: v for key, v in part.items() if key not in ("fn", "weight")}
        weight = float(part.get("weight", 1.0))
        for j, r in enumerate(VERIFIERS[part["fn"]](prompts, responses, references, **kwargs)):
            total[j] += weight * r
    return total


def _check_lengths(prompts: list, responses: list, references: list) -> None:
    if not len(prompts) == len(responses) == len(references):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(references)} references: "
                         "one of each per completion")
