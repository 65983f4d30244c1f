"""Dependency rules (DESIGN.md): models never import deepspeed / torch.distributed,
data_pipeline never imports llmstack, and neither imports the eval suite (data_pipeline <-
llmstack <- eval). Checked on the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def violations(folder: str, banned: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    out = []
    files = sorted((REPO / folder).rglob("*.py"))
    assert files, folder
    for f in files:
        if str(f.relative_to(REPO)) in allowed:
            continue
        for mod in imported_modules(f):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                out.append(f"{f.relative_to(REPO)} imports {mod}")
    return out


def test_models_do_not_import_distributed():
    assert violations("llmstack/models", ("deepspeed", "torch.distributed")) == []


def test_data_pipeline_does_not_import_llmstack():
    assert violations("data_pipeline", ("llmstack",)) == []


# The one exception: in-training evaluation on eval tasks runs the eval suite's engine on the live
# model, importing it lazily and only when train.eval_tasks is set (its docstring says why).
EVAL_IN_TRAINING = "llmstack/train/task_eval.py"


def test_library_does_not_import_eval():
    assert violations("llmstack", ("eval",), allowed=(EVAL_IN_TRAINING,)) + violations("data_pipeline", ("eval",)) == []


def test_eval_in_training_imports_eval_only_inside_functions():
    tree = ast.parse((REPO / EVAL_IN_TRAINING).read_text())
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m == "eval" or m.startswith("eval.") for m in top), top
    assert "eval.engine" in imported_modules(REPO / EVAL_IN_TRAINING)  # it does use the eval engine, lazily


def test_rule_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from torch import distributed\n    import deepspeed.comm\n")
    mods = imported_modules(bad)
    assert "torch.distributed" in mods and "deepspeed.comm" in mods
