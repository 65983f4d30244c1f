"""Output directories of the commands that write one (`export`, `import`, `checkpoint
consolidate`, `checkpoint reshape`): nothing a user had there is lost.

`--out` rules (`staged_output`): a missing or empty directory is written; an existing non-empty
one is refused (exit 2) unless `--overwrite`, and even then only when it is a previous output of the same
command: nothing in it but the files that command writes (a run directory, checkpoints, a
sub-directory or any other file make it refused) and its signature file (`config.json` for
export, `llmstack_model.json` of the same kind for consolidate / import). `checkpoint reshape`
needs no --overwrite to replace its own previous output (a universal checkpoint whose manifest
lists every file in it, see checkpoint.not_reshape_output): re-running it refreshes the copy.
The output is written into a fresh temp directory beside --out and swapped in only when
complete; the old directory is deleted only after the new one is in place, so an interrupted or
failed run leaves the previous output as it was. --out may not be (or contain) the command's input.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from llmstack.errors import UsageError
from llmstack.train import checkpoint as ckpt
from llmstack.train.meta import CheckpointMeta

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "llmstack_tokenizer.json",
                   "chat_template.jinja",
                   "sentencepiece.model", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")

# What each command writes into --out: (file names, pattern of further names, signature file).
# A directory is a previous output of the command only if it holds these and nothing else.
_OUTPUTS = {
    "export": ({"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                *TOKENIZER_FILES}, re.compile(r"model-\d{5}-of-\d{5}\.safetensors"), "config.json"),
    "checkpoint consolidate": ({"model.safetensors", "llmstack_model.json"}, None, "llmstack_model.json"),
    "import": ({"model.safetensors", "llmstack_model.json", *TOKENIZER_FILES}, None, "llmstack_model.json"),
}
# Commands that replace a previous output of their own without --overwrite (see module docstring).
_REPLACES_OWN = {"checkpoint reshape"}


def not_previous_output(out: Path, command: str) -> str | None:
    """Why the existing directory `out` is not a previous output of `llmstack <command>` (None if it is)."""
    if command == "checkpoint reshape":  # a directory tree, whose own manifest says what reshape wrote
        return ckpt.not_reshape_output(out)
    names, pattern, signature = _OUTPUTS[command]
    for entry in sorted(out.iterdir()):
        if entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name}{'/' if entry.is_dir() else ''}, which is not a plain file"
        if entry.name not in names and not (pattern and pattern.fullmatch(entry.name)):
            return f"it holds {entry.name}, which `llmstack {command}` does not write"
    if not (out / signature).is_file():
        return f"it has no {signature}"
    if signature == "llmstack_model.json":  # consolidate and import write the same names
        try:
            imported = CheckpointMeta.read(out / signature).hf_model_type is not None
        except (OSError, ValueError, TypeError):
            return f"its {signature} is not readable JSON"
        if imported != (command == "import"):
            return f"it was written by `llmstack {'import' if imported else 'checkpoint consolidate'}`"
    return None


def _within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output_dir(out: str | Path, command: str, *, overwrite: bool = False, inputs=()) -> None:
    """UsageError unless `llmstack <command>` may write --out `out` (rules: module docstring)."""
    out = Path(out)
    where = out.resolve()
    for src in inputs:
        # (--out inside the input is fine: `export runs/x --out runs/x/hf` replaces nothing of it)
        if src is not None and _within(Path(src).resolve(), where):
            raise UsageError(f"--out {out} is or contains the input {src}: choose another output directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite and command not in _REPLACES_OWN:
        raise UsageError(f"--out {out} exists and is not empty; pass --overwrite to replace a previous output "
                         f"of `llmstack {command}`, or choose another directory")
    if why := not_previous_output(out, command):
        rule = "it only replaces" if command in _REPLACES_OWN else "--overwrite only replaces"
        raise UsageError(f"--out {out}: refusing to overwrite it: {why}; {rule} a directory "
                         f"written by `llmstack {command}`")


@contextlib.contextmanager
def staged_output(out: str | Path, command: str, *, overwrite: bool = False, inputs=()):
    """Yield a fresh path to write `command`'s output to; swap it in as `out` when the block succeeds.

    The path is inside a new temp directory beside `out` (same filesystem, so the swap is a
    rename). A previous `out` (see `check_output_dir`, checked again before the swap) is moved
    into that temp directory, the new output renamed into its place, and only then the old one
    deleted; if the block fails, `out` is left untouched.
    """
    out = Path(out)
    check_output_dir(out, command, overwrite=overwrite, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        new = stage / "new"
        yield new
        check_output_dir(out, command, overwrite=overwrite, inputs=inputs)  # it may have changed meanwhile
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            os.replace(out, stage / "old")
            try:
                os.replace(new, out)
            except BaseException:
                os.replace(stage / "old", out)
                raise
        else:
            os.replace(new, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
