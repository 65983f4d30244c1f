"""Chat / SFT records: parsing, the chat template, and token ids with loss labels.

The chat template. A conversation is rendered as

    <|bos|> <|system|>TEXT<|end|> <|user|>TEXT<|end|> <|assistant|>TEXT<|end|> ... <|eos|>

(no spaces between the pieces): BOS exactly once at the start, every message is its role token,
its content and ``<|end|>``, and EOS exactly once at the end of the conversation. A generation
prompt (``add_generation_prompt``) is the conversation so far followed by ``<|assistant|>``, and
a chat reply ends at ``<|end|>`` (or EOS). The role tokens ``<|system|>``, ``<|user|>``,
``<|assistant|>`` and ``<|end|>`` are special tokens that every tokenizer trained by llmstack has
(tokenizer.py adds them at training time with fixed low ids); the same template is written as
Jinja into the tokenizer's Hugging Face files (``chat_template``), so
``AutoTokenizer.apply_chat_template`` gives exactly the ids of :func:`encode_chat`. Because the
role tokens are special, text between them is tokenized on its own, so encoding each message
separately and concatenating (what we do) equals tokenizing the rendered string (what
``transformers`` does). A tokenizer without the role tokens (for example an imported GPT-2 one)
is refused with a message naming the missing tokens.

Labels (the SFT loss mask): only assistant turns are supervised, i.e. the tokens of their content
and their ``<|end|>``, plus the final EOS when the conversation ends with a supervised assistant
turn; BOS, role headers (``<|assistant|>`` included), system and user messages are -100.
``train_on="last"`` supervises only the last assistant turn. Labels are aligned with the ids
(``labels[i]`` is ``ids[i]`` or -100); the causal shift happens when batches are made.

A tokenizer brought with a model (no llmstack metadata, a Jinja ``chat_template`` in its
Hugging Face files: Llama 3, Qwen, ...) is rendered with its own template instead, through
``transformers``' ``apply_chat_template`` (:func:`encode_own_chat`). Its loss labels are the
assistant spans: the template's ``{% generation %}`` blocks where it has them (exactly
``return_assistant_tokens_mask``), else found by rendering prefixes: for each assistant turn, the
conversation before it with ``add_generation_prompt=True`` and the conversation including it;
the text between the two ends (the reply and whatever the template closes it with, e.g.
``<|eot_id|>`` or ``<|im_end|>``) is supervised. A template whose prefixes are not prefixes of
the whole rendering (one that rewrites earlier turns) is refused for a conversation with a clear
error; it needs ``{% generation %}`` markers.

Records: JSONL (or HF dataset rows) with ``messages`` (a list of ``{"role", "content"}``, roles
system / user / assistant, multi-turn) or ``prompt`` / ``response`` (and optional ``system``).
A record that is not usable raises :class:`BadRecord` naming where it is and the field; callers
skip and count it (``data.on_error=skip``) or stop with a :class:`DataError` (``fail``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from data_pipeline.errors import BadRecord, DataError, ErrorLog, FileFault, location

ROLES = ("system", "user", "assistant")
IGNORE = -100
# kinds of bad chat records (counted per kind in an ErrorLog, like the text readers' kinds)
CHAT_ERROR_KINDS = ("invalid_utf8", "malformed_json", "missing_field", "unknown_role", "no_assistant",
                    "empty_response", "empty_text")
DEMO_PREFIX = "builtin-sft"  # source spec of the demo instruction pairs: builtin-sft:train | builtin-sft:validation
ARITH_PREFIX = "builtin-arith"  # the demo verifiable task: builtin-arith:train | builtin-arith:validation


# ---------------------------------------------------------------------------------------------
# Records -> messages


def parse_chat_record(record: Any, where: str) -> list[dict]:
    """The messages ([{"role", "content"}, ...]) of one record, or BadRecord naming `where` and the field.

    A record has ``messages`` or ``prompt`` + ``response`` (+ optional ``system``). Every message
    needs a known role and non-empty string content, and at least one assistant turn is required.
    """
    if not isinstance(record, dict):
        raise BadRecord("missing_field", f"{where}: record is {type(record).__name__}, not an object")
    # a null field counts as absent: HF datasets give every row every column of the file
    record = {k: v for k, v in record.items() if v is not None}
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise BadRecord("missing_field", f"{where}: field 'messages' must be a non-empty list")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise BadRecord("missing_field", f"{where}: messages[{i}] needs 'role' and 'content'")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise BadRecord("unknown_role", f"{where}: messages[{i}].role is {role!r} "
                                f"(allowed: {', '.join(ROLES)})")
            messages.append(_message(role, content, f"{where}: messages[{i}].content"))
    elif "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if key not in record:
                raise BadRecord("missing_field", f"{where}: record has no field {key!r}")
        messages = []
        if "system" in record:
            messages.append(_message("system", record["system"], f"{where}: field 'system'"))
        messages.append(_message("user", record["prompt"], f"{where}: field 'prompt'"))
        messages.append(_message("assistant", record["response"], f"{where}: field 'response'"))
    else:
        raise BadRecord("missing_field", f"{where}: record has neither 'messages' nor 'prompt'/'response' "
                        f"(fields: {', '.join(map(str, record)) or 'none'})")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant", f"{where}: no assistant turn (nothing to learn from)")
    return messages


def _message(role: str, content: Any, what: str) -> dict:
    if not isinstance(content, str):
        raise BadRecord("missing_field", f"{what} is {type(content).__name__}, not a string")
    if not content.strip():
        kind = "empty_response" if role == "assistant" else "empty_text"
        raise BadRecord(kind, f"{what} is empty")
    return {"role": role, "content": content}


# ---------------------------------------------------------------------------------------------
# The template and encoding


def chat_tokens(tokenizer) -> dict[str, int]:
    """Ids of bos, eos and the role tokens (system, user, assistant, end); ValueError naming the missing ones."""
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, **{r: tokenizer.role_ids.get(r) for r in (*ROLES, "end")}}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise ValueError(f"tokenizer {tokenizer.path} lacks the chat tokens {', '.join(missing)} and has no "
                         "chat_template of its own: SFT needs a tokenizer trained by `llmstack tokenizer train` "
                         "(it adds <|system|>, <|user|>, <|assistant|>, <|end|> as special tokens), one with the "
                         "same special tokens, or a Hugging Face tokenizer with a chat_template")
    return ids


# ---------------------------------------------------------------------------------------------
# A model's own chat template (tokenizers brought with imported models)

_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")
_hf_tokenizers: dict[tuple[str, str], Any] = {}


def _template_in_files(path: str) -> bool:
    """Whether a tokenizer directory's Hugging Face files hold a chat template."""
    d = Path(path)
    if (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(isinstance(config, dict) and config.get("chat_template"))


def own_template(tokenizer):
    """The ``transformers`` tokenizer (loaded once per directory) whose chat template renders
    conversations for `tokenizer`, or None when llmstack's own template applies: for tokenizers
    trained by llmstack (they carry its metadata) and for those without a template of their own."""
    if getattr(tokenizer, "meta", None) or not os.path.isdir(str(getattr(tokenizer, "path", ""))):
        return None
    key = (str(tokenizer.path), str(getattr(tokenizer, "hash", "")))
    if key not in _hf_tokenizers:
        hf = None
        if _template_in_files(key[0]):
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast.from_pretrained(key[0])
            if not hf.chat_template or not isinstance(hf.chat_template, str):
                hf = None  # none, or several named ones (tool use...): not a plain chat template
        _hf_tokenizers[key] = hf
    return _hf_tokenizers[key]


def check_chat_tokenizer(tokenizer) -> dict:
    """How `tokenizer` renders chats: {"template": "llmstack" | "own", "eos": id or None,
    "markers": the own template has {% generation %} blocks}; ValueError when it cannot (neither
    llmstack's chat tokens nor a chat template of its own)."""
    hf = own_template(tokenizer)
    if hf is None:
        return {"template": "llmstack", "eos": chat_tokens(tokenizer)["eos"], "markers": True}
    return {"template": "own", "eos": tokenizer.eos_id, "markers": bool(_GENERATION.search(hf.chat_template))}


def _render(hf, messages: list[dict], **kw) -> str:
    return hf.apply_chat_template(messages, tokenize=False, **kw)


def _prefix_spans(hf, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character span of each assistant turn), found by rendering
    prefixes: before turn i with the generation prompt, and up to and including turn i."""
    full = _render(hf, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation starts with an assistant turn: a chat template without "
                             "{% generation %} markers needs a message before it to find where the reply starts")
        head = _render(hf, messages[:i], add_generation_prompt=True)
        upto = _render(hf, messages[:i + 1])
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ValueError(f"the chat template of {hf.name_or_path} renders assistant turn {i} differently as a "
                             "prefix than in the whole conversation, so its reply span cannot be found; add "
                             "{% generation %} ... {% endgeneration %} around the assistant content in the template")
        spans.append((len(head), len(upto)))
    return full, spans


def encode_own_chat(tokenizer, messages: list[dict], *, train_on: str = "all") -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation under the tokenizer's own chat template (see the module
    docstring): ids are ``apply_chat_template(messages)``; labels are the ids of the assistant
    spans ({% generation %} blocks, or found by rendering prefixes) and -100 elsewhere."""
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    hf = own_template(tokenizer)
    if hf is None:
        raise ValueError(f"tokenizer {tokenizer.path} has no chat_template of its own")
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role is {m.get('role')!r} (allowed: {', '.join(ROLES)})")
    from jinja2 import TemplateError

    try:
        return _own_chat(hf, messages, train_on)
    except TemplateError as e:  # the template's own raise_exception (e.g. "System role not supported")
        raise ValueError(f"the chat template of {hf.name_or_path} refuses this conversation: {e}") from None


def _own_chat(hf, messages: list[dict], train_on: str) -> tuple[list[int], list[int]]:
    if _GENERATION.search(hf.chat_template):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        text, spans = _prefix_spans(hf, messages)
        enc = hf(text, add_special_tokens=False)
        ids, mask = list(enc["input_ids"]), [0] * len(enc["input_ids"])
        for start, end in spans:  # characters -> tokens, as transformers maps {% generation %} spans
            if end <= start:
                continue
            first, last = enc.char_to_token(start), enc.char_to_token(end - 1)
            if first is None:  # the span starts on characters no token covers (as transformers: skipped)
                continue
            for t in range(first, (last + 1) if last is not None else len(ids)):
                mask[t] = 1
    if train_on == "last":  # only the last run of supervised tokens (the last assistant turn)
        ends = [t for t in range(len(mask)) if mask[t] and (t + 1 == len(mask) or not mask[t + 1])]
        if ends:
            start = ends[-1]
            while start > 0 and mask[start - 1]:
                start -= 1
            mask = [int(start <= t <= ends[-1]) for t in range(len(mask))]
    return ids, [i if m else IGNORE for i, m in zip(ids, mask)]


def chat_template(role_tokens: dict[str, str], bos: str, eos: str) -> str:
    """The Jinja chat template (Hugging Face `chat_template`) for these token strings.

    Assistant content, its end token and the final EOS sit in `{% generation %}` blocks, so
    `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the tokens that
    `encode_chat` supervises (train_on="all").
    """
    end, assistant = role_tokens["end"], role_tokens["assistant"]
    heads = "".join(f"{'if' if i == 0 else 'elif'} message['role'] == '{r}' %}}{{{{- '{role_tokens[r]}' -}}}}{{%- "
                    for i, r in enumerate(ROLES))
    return (
        f"{{{{- '{bos}' -}}}}"
        "{%- for message in messages -%}"
        f"{{%- {heads}else %}}{{{{- raise_exception('unknown role: ' + message['role']) -}}}}{{%- endif -%}}"
        "{%- if message['role'] == 'assistant' -%}"
        f"{{%- generation -%}}{{{{- message['content'] + '{end}' -}}}}"
        f"{{%- if loop.last and not add_generation_prompt -%}}{{{{- '{eos}' -}}}}{{%- endif -%}}{{%- endgeneration -%}}"
        f"{{%- else -%}}{{{{- message['content'] + '{end}' -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{assistant}' -}}}}"
        f"{{%- elif not messages or messages[-1]['role'] != 'assistant' -%}}{{{{- '{eos}' -}}}}{{%- endif -%}}"
    )


def _encode_turns(tokenizer, messages: list[dict], ids: dict[str, int]) -> list[tuple[str, list[int]]]:
    """(role, content ids) per message, the contents encoded in one batch."""
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role is {m.get('role')!r} (allowed: {', '.join(ROLES)})")
    contents = tokenizer.encode_batch([m["content"] for m in messages]) if messages else []
    return [(m["role"], c) for m, c in zip(messages, contents)]


def encode_chat(tokenizer, messages: list[dict], *, train_on: str = "all") -> tuple[list[int], list[int]]:
    """(ids, labels) of a whole conversation under the chat template (see the module docstring).

    ids equal ``apply_chat_template(messages)`` of the exported tokenizer; labels are the ids on
    supervised positions (assistant content + its <|end|>, the final EOS after a supervised last
    turn) and -100 elsewhere. train_on: "all" assistant turns, or only the "last" one.
    """
    if own_template(tokenizer) is not None:  # a model's own tokenizer: its own chat template
        return encode_own_chat(tokenizer, messages, train_on=train_on)
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
    tok = chat_tokens(tokenizer)
    turns = _encode_turns(tokenizer, messages, tok)
    last_assistant = max((i for i, (r, _) in enumerate(turns) if r == "assistant"), default=-1)
    ids, labels = [tok["bos"]], [IGNORE]
    supervised = False
    for i, (role, content) in enumerate(turns):
        supervised = role == "assistant" and (train_on == "all" or i == last_assistant)
        body = [*content, tok["end"]]
        ids += [tok[role], *body]
        labels += [IGNORE, *(body if supervised else [IGNORE] * len(body))]
    ids.append(tok["eos"])
    labels.append(tok["eos"] if supervised else IGNORE)  # `supervised` is the last turn's
    return ids, labels


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the conversation so far plus the assistant header: what a chat model continues
    (= ``apply_chat_template(messages, add_generation_prompt=True)``), under the tokenizer's own
    chat template when it brings one (see `own_template`), else llmstack's."""
    hf = own_template(tokenizer)
    if hf is not None:
        for i, m in enumerate(messages):
            if m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role is {m.get('role')!r} (allowed: {', '.join(ROLES)})")
        from jinja2 import TemplateError

        try:
            out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        except TemplateError as e:
            raise ValueError(f"the chat template of {hf.name_or_path} refuses this conversation: {e}") from None
        return list(out["input_ids"])
    tok = chat_tokens(tokenizer)
    ids = [tok["bos"]]
    for role, content in _encode_turns(tokenizer, messages, tok):
        ids += [tok[role], *content, tok["end"]]
    return ids + [tok["assistant"]]


# ---------------------------------------------------------------------------------------------
# Reading chat records from sources


def _records_of_units(units) -> Iterator[tuple[Any, str, int, Any]]:
    """(unit, loc, pos, record-or-BadRecord) of JSONL files and HF datasets, in order."""
    for unit in units:
        try:
            for pos, raw in unit.records(0):
                if isinstance(raw, (bytes, bytearray)):
                    try:
                        rec: Any = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        rec = BadRecord("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line")
                    except json.JSONDecodeError as e:
                        rec = BadRecord("malformed_json", f"not valid JSON ({e.msg})")
                else:
                    rec = raw
                yield unit, unit.loc, pos, rec
        except FileFault as e:
            yield unit, unit.loc, e.pos, BadRecord(e.kind, e.detail)


def _hf_disk_rows(path: str, split: str | None) -> Iterator[tuple[int, dict]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(f"{path} holds splits {', '.join(ds)}; name one as hf:{path}:SPLIT")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield i, row


class _Rows:
    """A unit-like wrapper of (pos, row) pairs (save_to_disk datasets, the demo pairs)."""

    def __init__(self, path: str, loc: str, rows):
        self.path, self.loc, self._rows = path, loc, rows

    def records(self, start: int = 0):
        return self._rows


def chat_units(spec: str) -> list:
    """The readable units of a chat source spec: .jsonl(.gz/.zst) files or globs, ``hf:...``
    datasets (streaming or save_to_disk), ``builtin-sft:train|validation`` (the demo pairs) or
    ``builtin-arith:train|validation`` (the demo arithmetic task, prompt + response + answer).
    FileNotFoundError for missing files, DataError for unsupported specs."""
    from data_pipeline import builtin, sources

    if spec.startswith(DEMO_PREFIX):
        split = spec.partition(":")[2] or "train"
        builtin.check_split(split)
        return [_Rows(spec, "pair", enumerate(builtin.builtin_sft_pairs(split)))]
    if spec.startswith(ARITH_PREFIX):
        split = spec.partition(":")[2] or "train"
        builtin.check_split(split)
        return [_Rows(spec, "task", enumerate(builtin.builtin_arith_tasks(split)))]
    if spec.startswith("hf:") or os.path.isdir(spec):
        rest = spec[3:] if spec.startswith("hf:") else spec
        parts = rest.split(":")
        if os.path.isdir(parts[0]) and sources._is_hf_disk(parts[0]):
            return [_Rows(parts[0], "row", _hf_disk_rows(parts[0], parts[1] if len(parts) > 1 else None))]
    src = sources.resolve_source(spec)
    for u in src.units:
        if not (u.path.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")) or isinstance(u, sources.HFStreaming)):
            raise DataError(f"{u.path}: chat records are read from .jsonl, .jsonl.gz, .jsonl.zst files or hf: datasets")
    return src.units


def iter_chat_records(spec: str, *, on_error: str = "skip", errors: ErrorLog | None = None) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) of every usable record of a chat source, in order.

    Bad records are counted in `errors` (on_error="skip") or raise DataError naming file:line
    and the field (on_error="fail").
    """
    yield from parsed_records(chat_units(spec), parse_chat_record, on_error, errors)


def parsed_records(units, parse, on_error: str, errors: ErrorLog | None) -> Iterator[tuple[str, Any]]:
    """(where, parse(record, where)) of every usable record of `units`; bad ones counted in
    `errors` (on_error="skip") or raised as DataError naming file:line (on_error="fail")."""
    for unit, loc, pos, rec in _records_of_units(units):
        # a cheap position for every record; the line number (a scan of the file) only for bad ones
        where = f"{unit.path} ({loc} {pos})"
        try:
            if isinstance(rec, BadRecord):
                raise BadRecord(rec.kind, f"{where}: {rec.detail}")
            yield where, parse(rec, where)
        except BadRecord as e:
            detail = e.detail.removeprefix(f"{where}: ")
            if on_error == "fail":
                raise DataError(f"{location(unit.path, loc, pos)}: {detail}") from None
            if errors is not None:
                errors.add(unit.path, loc, pos, e.kind, detail)


# --- preference pairs and PPO prompts ---
# Preference records (reward model, DPO), one of:
#   {"prompt": str, "chosen": str, "rejected": str, "system"?: str}
#   {"prompt": [messages], "chosen": str | [assistant message], "rejected": ...}
#   {"chosen": [messages], "rejected": [messages]}   (whole conversations that differ only in the
#                                                     last assistant turn: the prompt is the rest)
# PPO prompt records: {"prompt": str, "system"?: str}, {"messages": [...]} (trailing assistant
# turns are dropped: the policy answers the conversation so far), or any preference / SFT record
# (its answers ignored).

PREF_PREFIX = "builtin-prefs"  # the demo preference pairs: builtin-prefs:train | builtin-prefs:validation


def _prompt_messages(record: dict, where: str) -> list[dict]:
    """The prompt conversation of a record with a 'prompt' field (string or message list)."""
    prompt = record["prompt"]
    messages = []
    if record.get("system") is not None:
        messages.append(_message("system", record["system"], f"{where}: field 'system'"))
    if isinstance(prompt, str):
        return messages + [_message("user", prompt, f"{where}: field 'prompt'")]
    if not isinstance(prompt, list) or not prompt:
        raise BadRecord("missing_field", f"{where}: field 'prompt' must be a string or a non-empty message list")
    return messages + _message_list(prompt, where, "prompt")


def _message_list(raw: list, where: str, field: str) -> list[dict]:
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord("missing_field", f"{where}: {field}[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise BadRecord("unknown_role", f"{where}: {field}[{i}].role is {m['role']!r} (allowed: {', '.join(ROLES)})")
        out.append(_message(m["role"], m["content"], f"{where}: {field}[{i}].content"))
    return out


def _answer(value: Any, where: str, field: str) -> str:
    """An answer given as a string or as a one-message list [{"role": "assistant", ...}]."""
    if isinstance(value, list):
        msgs = _message_list(value, where, field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise BadRecord("missing_field", f"{where}: field {field!r} must be one assistant message when "
                            "'prompt' is given")
        return msgs[0]["content"]
    return _message("assistant", value, f"{where}: field {field!r}")["content"]


def parse_preference_record(record: Any, where: str) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen answer, rejected answer) of one preference record, or BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("missing_field", f"{where}: record is {type(record).__name__}, not an object")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise BadRecord("missing_field", f"{where}: record has no field {key!r} "
                            f"(fields: {', '.join(map(str, record)) or 'none'})")
    if "prompt" in record:
        return (_prompt_messages(record, where), _answer(record["chosen"], where, "chosen"),
                _answer(record["rejected"], where, "rejected"))
    chosen, rejected = record["chosen"], record["rejected"]
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise BadRecord("missing_field", f"{where}: without 'prompt', 'chosen' and 'rejected' must be message lists")
    c, r = _message_list(chosen, where, "chosen"), _message_list(rejected, where, "rejected")
    for name, conv in (("chosen", c), ("rejected", r)):
        if len(conv) < 2 or conv[-1]["role"] != "assistant":
            raise BadRecord("no_assistant", f"{where}: {name} must be a prompt followed by an assistant answer")
    if c[:-1] != r[:-1]:
        raise BadRecord("mismatched_prompt", f"{where}: chosen and rejected differ before their last assistant turn")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def parse_prompt_record(record: Any, where: str) -> list[dict]:
    """The prompt conversation of a PPO prompt record (see above), or BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord("missing_field", f"{where}: record is {type(record).__name__}, not an object")
    if "prompt" in record:
        return _prompt_messages(record, where)
    # a null field counts as absent: HF datasets give every row every column of the file
    record = {k: v for k, v in record.items() if v is not None}
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise BadRecord("missing_field", f"{where}: field 'messages' must be a non-empty list")
        msgs = _message_list(raw, where, "messages")
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        if not msgs:
            raise BadRecord("missing_field", f"{where}: no user turn before the assistant's")
        return msgs
    if isinstance(record.get("chosen"), list):
        return parse_preference_record(record, where)[0]
    raise BadRecord("missing_field", f"{where}: record has neither 'prompt' nor 'messages' "
                    f"(fields: {', '.join(map(str, record)) or 'none'})")


def encode_preference(tokenizer, prompt: list[dict], chosen: str, rejected: str) -> dict:
    """Token ids and labels of both conversations (prompt + answer) under the chat template.

    labels are -100 outside the final assistant answer (its content, <|end|> and EOS): the tokens
    a reward model's last position and DPO's log-probs are about.
    """
    out = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = encode_chat(tokenizer, [*prompt, {"role": "assistant", "content": answer}], train_on="last")
        out[f"{name}_ids"], out[f"{name}_labels"] = ids, labels
    return out


def preference_units(spec: str) -> list:
    """Readable units of a preference / prompt source: ``builtin-prefs:SPLIT`` or any chat source."""
    from data_pipeline import builtin

    if spec.startswith(PREF_PREFIX):
        split = spec.partition(":")[2] or "train"
        builtin.check_split(split)
        return [_Rows(spec, "pair", enumerate(builtin.builtin_preference_pairs(split)))]
    return chat_units(spec)


def iter_preference_records(spec: str, *, on_error: str = "skip", errors: ErrorLog | None = None):
    """(where, (prompt messages, chosen, rejected)) of every usable pair of a source, in order;
    bad records counted in `errors` (skip) or a DataError naming file:line (fail)."""
    yield from parsed_records(preference_units(spec), parse_preference_record, on_error, errors)


def iter_prompt_records(spec: str, *, on_error: str = "skip", errors: ErrorLog | None = None):
    """(where, prompt messages) of every usable PPO prompt record of a source, in order."""
    yield from parsed_records(preference_units(spec), parse_prompt_record, on_error, errors)


def iter_task_records(spec: str, *, reference_field: str = "answer", on_error: str = "skip",
                      errors: ErrorLog | None = None):
    """(where, prompt messages, reference) of every usable task record of a source, in order.

    The prompt is read as by :func:`iter_prompt_records`; the reference is the record's
    `reference_field` (an answer, test code, ...) as stored, or None when absent: whether a task
    needs one is the verifier's business, not the reader's.
    """
    def parse(record: Any, where: str) -> tuple[list[dict], Any]:
        messages = parse_prompt_record(record, where)  # BadRecord unless record is an object
        return messages, record.get(reference_field)

    for where, (messages, reference) in parsed_records(preference_units(spec), parse, on_error, errors):
        yield where, messages, reference
