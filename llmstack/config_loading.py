"""Loading a config: YAML file + `key.sub=value` overrides -> one validated schema object.

Precedence is fixed: schema defaults < YAML file < overrides. Errors (a missing file, bad YAML, an
override that is not key=value, an unknown key, a wrong type) are ConfigErrors naming the dotted
key and what is allowed there. The schemas themselves are in llmstack/config.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmstack.errors import ConfigError



def parse_override(arg: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML, so lists and numbers work)."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r} is not of the form key.sub=value")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {arg!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    return parts, value


def set_dotted(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(schema: type[BaseModel], path: str | None, overrides: list[str] = ()) -> BaseModel:
    """Resolve defaults < YAML < overrides and validate. Raises ConfigError with a clear message."""
    data = read_yaml(path) if path else {}
    for arg in overrides:
        set_dotted(data, *parse_override(arg))
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}:\n" + format_errors(schema, e)) from None


def _field_model(schema: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last element of `loc` (for listing allowed keys)."""
    model = schema
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        # unwrap Optional[...] / list[...] to find a nested model
        cands = [ann, *getattr(ann, "__args__", ())]
        for a in list(cands):
            cands.extend(getattr(a, "__args__", ()))
        model = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def format_errors(schema: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        key = ".".join(str(x) for x in loc)
        if not key:  # a check across sections: its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            owner = _field_model(schema, loc)
            allowed = ", ".join(owner.model_fields) if owner else "?"
            lines.append(f"  {key}: unknown key (allowed here: {allowed})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)
