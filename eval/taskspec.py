"""Task specs: YAML close to lm-evaluation-harness, their datasets, prompts and few-shot contexts.

A spec names a dataset and how a document becomes a prompt:

    task: my_task
    dataset_path: json                      # json | csv (local files), llmstack:demo_mc, or a Hub dataset
    dataset_kwargs: {data_files: {test: my_task.jsonl, train: shots.jsonl}}
    test_split: test
    fewshot_split: train                    # else training_split, validation_split, then test_split
    output_type: multiple_choice            # | loglikelihood | generate_until | loglikelihood_rolling
    doc_to_text: "Question: {{question}}\\nAnswer:"   # a field name or a Jinja template
    doc_to_target: label                    # index into the choices, or the answer text
    doc_to_choice: "{{choices}}"            # a field, a list, or a template giving a list
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    metric_list: [{metric: acc}, {metric: acc_norm}]

Field values follow the harness: a string that names a field of the document is that field,
anything else is rendered as a Jinja template, sandboxed (Python internals out of reach), with
undefined names an error (filter `regex_replace` available); a rendered target or text that is
all digits is an index when the task has choices, a rendered "[...]" a list. A prompt is: description, then for each few-shot
example text + target_delimiter + answer + fewshot_delimiter, then the document's text.
Few-shot examples are drawn per document, in document order, by one `random.Random(seed)`
(`rnd.sample(pool, k)`, the harness's sampler, so the same seed gives the same prompts); when
the pool is the evaluated split the document itself is never its own example (the harness excludes
it only when `fewshot_split` names that split; without `fewshot_split` it may show a document its
own answer, so give `fewshot_split` where results should match it).
With a chat template (`--apply-chat-template`), the same pieces become messages, as the harness's
`fewshot_context` builds them: a system turn (`--system-instruction`, then the description, joined
by the few-shot delimiter), each few-shot example a user turn (its text) and an assistant turn (its
answer), then the document's text as the last user turn, rendered by the tokenizer's template with
the generation prompt; without `--fewshot-as-multiturn` the examples and the document are one user
message in plain text. A scored continuation then follows the assistant header directly (no target
delimiter).
Relative data_files are looked up beside the YAML file first, then in the working directory.
Unknown keys, missing fields and empty datasets are errors naming the task and the field.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from llmstack.errors import UsageError

TASK_DIR = Path(__file__).resolve().parent / "tasks"
METRICS = {
    "multiple_choice": ("acc", "acc_norm", "acc_chars"),
    "loglikelihood": ("acc", "perplexity"),
    "generate_until": ("exact_match", "f1"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
}


class MetricSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str
    aggregation: str | None = None  # accepted for harness compatibility: ours is fixed per metric
    higher_is_better: bool | None = None
    ignore_case: bool = False
    ignore_punctuation: bool = False
    normalize: list[str] = []  # lower | strip_punctuation | strip_articles | collapse_whitespace


class FewshotSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sampler: Literal["default", "first_n"] = "default"


class GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    until: list[str] = []
    max_gen_toks: int = 32
    do_sample: Literal[False] = False  # greedy only
    temperature: float = 0.0


class TaskSpec(BaseModel):
    """One task, as written in its YAML file."""

    model_config = ConfigDict(extra="forbid")
    task: str
    task_alias: str | None = None
    tag: str | list[str] | None = None
    dataset_path: str
    dataset_name: str | None = None
    dataset_kwargs: dict[str, Any] | None = None
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str
    fewshot_split: str | None = None
    fewshot_config: FewshotSpec = FewshotSpec()
    output_type: Literal["multiple_choice", "loglikelihood", "generate_until", "loglikelihood_rolling"]
    doc_to_text: str | int | None = None
    doc_to_target: str | int | None = None
    doc_to_choice: str | list[str] | None = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int | None = None
    metric_list: list[MetricSpec] | None = None
    generation_kwargs: GenerationSpec | None = None
    metadata: dict[str, Any] | None = None

    def metrics(self) -> list[MetricSpec]:
        return self.metric_list or [MetricSpec(metric=m) for m in METRICS[self.output_type][:2]]


def builtin_task_files() -> dict[str, Path]:
    """{task name: YAML file} of the specs shipped in eval/tasks/."""
    out = {}
    for f in sorted(TASK_DIR.glob("*.yaml")):
        try:
            name = (yaml.safe_load(f.read_text()) or {}).get("task")
        except yaml.YAMLError:
            continue
        out[name or f.stem] = f
    return out


def load_spec(name_or_path: str) -> tuple[TaskSpec, Path]:
    """A task spec by builtin name or YAML path; bad keys or values name the task and the field."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UsageError(f"task file not found: {p}")
        file = p
    else:
        files = builtin_task_files()
        if name_or_path not in files:
            raise UsageError(f"unknown task {name_or_path!r} (builtin: {', '.join(files)}; or ppl:SOURCE, or a .yaml file)")
        file = files[name_or_path]
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"task file {file}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"task file {file}: expected a mapping of task fields")
    label = raw.get("task", file.stem)
    try:
        spec = TaskSpec(**raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                problems.append(f"unknown field {loc!r} (allowed: {', '.join(TaskSpec.model_fields)})"
                                if len(err["loc"]) == 1 else f"unknown field {loc!r}")
            else:
                problems.append(f"field {loc!r}: {err['msg']}")
        raise UsageError(f"task {label} ({file}): " + "; ".join(problems)) from None
    allowed = METRICS[spec.output_type]
    for m in spec.metrics():
        if m.metric not in allowed:
            raise UsageError(f"task {label}: field 'metric_list': metric {m.metric!r} is not available for "
                             f"output_type {spec.output_type} (allowed: {', '.join(allowed)})")
    if spec.output_type == "multiple_choice" and spec.doc_to_choice is None:
        raise UsageError(f"task {label}: field 'doc_to_choice' is required for multiple_choice")
    return spec, file


# -- datasets ---------------------------------------------------------------------------------
def _read_local(path: Path, kind: str, task: str) -> list[dict]:
    """The documents of a local .json (an array, or one object per line), .jsonl or .csv file.
    Anything unreadable (permissions, invalid UTF-8, malformed JSON or CSV, a non-object
    document) is a UsageError naming the task and file:line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"task {task}: cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = data.count(b"\n", 0, e.start) + 1, e.start - data.rfind(b"\n", 0, e.start)
        raise UsageError(f"task {task}: {path}:{line}: invalid UTF-8 (byte {col} of the line); task data must be "
                         "UTF-8") from None
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            return list(reader)
        except csv.Error as e:
            raise UsageError(f"task {task}: {path}:{reader.line_num}: malformed CSV ({e})") from None
    if kind == "json" and text.lstrip().startswith("["):
        try:
            docs = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"task {task}: {path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
        bad = next((i for i, d in enumerate(docs) if not isinstance(d, dict)), None)
        if bad is not None:
            raise UsageError(f"task {task}: {path}: element {bad} of the array is not a JSON object")
        return docs
    docs = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a JSON string
        if line.strip():
            try:
                docs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"task {task}: {path}:{n}: malformed JSON ({e.msg})") from None
            if not isinstance(docs[-1], dict):
                raise UsageError(f"task {task}: {path}:{n}: expected a JSON object per line")
    return docs


def _local_file(name: str, base: Path, task: str) -> Path:
    for cand in (base / name, Path(name)):
        if cand.is_file():
            return cand
    raise UsageError(f"task {task}: data file {name} not found (looked beside {base} and in the working directory)")


def load_split(spec: TaskSpec, split: str, base: Path) -> list[dict]:
    """The documents of one split: local json/csv files, a builtin dataset, or the Hub."""
    kind = spec.dataset_path
    if kind.startswith("llmstack:"):
        from eval.demo import builtin_dataset

        return builtin_dataset(kind.partition(":")[2], split, spec.task)
    kwargs = dict(spec.dataset_kwargs or {})
    if kind in ("json", "csv"):
        files = kwargs.get("data_files")
        if isinstance(files, (str, list)):
            files = {"train": files}
        if not isinstance(files, dict) or split not in files:
            raise UsageError(f"task {spec.task}: field 'dataset_kwargs.data_files' has no file for split {split!r}")
        names = files[split] if isinstance(files[split], list) else [files[split]]
        return [d for n in names for d in _read_local(_local_file(n, base, spec.task), kind, spec.task)]
    try:
        import datasets

        ds = datasets.load_dataset(kind, spec.dataset_name, split=split, **kwargs)
    except Exception as e:  # the Hub, offline mode, a wrong name: all end the same way for the user
        raise UsageError(f"task {spec.task}: could not load dataset {kind!r}"
                         f"{' / ' + spec.dataset_name if spec.dataset_name else ''} split {split!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return [dict(d) for d in ds]


# -- templates --------------------------------------------------------------------------------
_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        from jinja2 import BaseLoader, StrictUndefined
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # A task YAML is data from anywhere: its templates run sandboxed (no access to attributes
        # like __class__ / __globals__, no mutating methods, bounded range), so a template cannot
        # reach Python internals and run code. The helper globals are dropped too (cycler and
        # joiner are classes, lipsum is unneeded); range, dict and namespace stay.
        _ENV = ImmutableSandboxedEnvironment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
        for name in ("cycler", "joiner", "lipsum"):
            _ENV.globals.pop(name, None)
        _ENV.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return _ENV


class DocError(Exception):
    """A document that a template cannot be applied to (turned into a UsageError naming the sample)."""


def resolve(template, doc: dict, field: str, has_choices: bool):
    """Apply one doc_to_* value to a document (see the module docstring)."""
    if template is None:
        raise DocError(f"field {field!r} is not set")
    if isinstance(template, (int, list)):
        return template
    if template in doc:
        return doc[template]
    from jinja2 import TemplateError
    from jinja2.exceptions import SecurityError

    try:
        out = _env().from_string(template).render(**doc)
    except SecurityError as e:
        raise DocError(f"{field}: template refused: {e} (task templates run in a sandbox)") from None
    except TemplateError as e:
        raise DocError(f"{field}: {e} (the sample's fields: {', '.join(doc)})") from None
    except Exception as e:  # an expression in the template failed on this document
        raise DocError(f"{field}: {type(e).__name__}: {e}") from None
    if field == "doc_to_choice":
        try:
            value = ast.literal_eval(out)
        except (ValueError, SyntaxError):
            raise DocError(f"doc_to_choice: {out[:80]!r} is not a list") from None
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise DocError(f"doc_to_choice: {out[:80]!r} is not a list of strings")
        return value
    if out.isdigit() and has_choices:
        return int(out)
    if len(out) >= 2 and out[0] == "[" and out[-1] == "]":
        try:
            return ast.literal_eval(out)
        except (ValueError, SyntaxError):
            return out
    return out


@dataclass
class Turn:
    """One message of a prompt (lm-evaluation-harness's `Message`): role, content, and `after`, the
    text that follows it in a plain-text prompt (the target delimiter after a few-shot question, the
    few-shot delimiter after its answer). A chat template sees role and content only."""

    role: str  # system | user | assistant
    content: str
    after: str = ""


def plain_text(turns: list[Turn]) -> str:
    """The prompt without a chat template: every turn's content followed by its `after` text."""
    return "".join(t.content + t.after for t in turns)


def chat_messages(turns: list[Turn], multiturn: bool) -> list[dict]:
    """The messages a chat template renders, as the harness builds them: with `multiturn`, every
    few-shot question and answer its own user / assistant turn; otherwise (the harness's
    `multiturn_to_singleturn`) the system turn alone and everything else one user message, its
    plain text."""
    if multiturn:
        return [{"role": t.role, "content": t.content} for t in turns]
    system, rest = (turns[0], turns[1:]) if turns and turns[0].role == "system" else (None, turns)
    user = {"role": "user", "content": plain_text(rest[:-1]) + rest[-1].content}
    return ([{"role": "system", "content": system.content}] if system else []) + [user]


def join_delimited(prefix: str | None, suffix: str | None, delimiter: str) -> str:
    """prefix + delimiter + suffix, without the delimiter when either is empty or there is
    whitespace at the join (the harness's `maybe_delimit`, which joins the system instruction and
    the task description)."""
    if not prefix:
        return suffix or ""
    if not suffix:
        return prefix
    return prefix + suffix if prefix[-1].isspace() or suffix[0].isspace() else prefix + delimiter + suffix


class Prepared:
    """A task's documents turned into prompts: per document the context(s), choices and gold.

    Each document's prompt is kept as turns (`turns`: the system text and the few-shot examples;
    `queries`: the document's own text, or one text per choice for multiple inputs), so that
    `apply_chat` can render it with a model's chat template once the tokenizer is known;
    `contexts` is the rendered prompt, plain text until then."""

    def __init__(self, spec: TaskSpec, docs: list[dict], turns: list[list[Turn]], queries: list[Any],
                 choices: list[list[str] | None], golds: list[Any], multiple_input: list[bool],
                 targets: list[str | None]):
        self.spec, self.docs, self.turns, self.queries, self.choices = spec, docs, turns, queries, choices
        self.golds, self.multiple_input = golds, multiple_input
        self.targets = targets  # multiple inputs: the continuation shared by every choice's context
        # what goes between a context and a scored continuation: the spec's target delimiter in a
        # plain prompt; nothing after a chat template's assistant header (as the harness)
        self.target_delimiter = spec.target_delimiter
        self.chat: dict | None = None  # how apply_chat rendered the prompts
        self.contexts = [self._render(i, plain_text) for i in range(len(docs))]

    def _render(self, i: int, render) -> Any:
        q = self.queries[i]
        if q is None:  # loglikelihood_rolling: no context
            return ""
        if isinstance(q, list):
            return [render([*self.turns[i], Turn("user", c)]) for c in q]
        return render([*self.turns[i], Turn("user", q)])

    def apply_chat(self, template, multiturn: bool) -> None:
        """Render every prompt with `template` (messages -> text, the generation prompt added),
        the few-shot examples as separate turns with `multiturn`, else in one user message."""
        self.contexts = [self._render(i, lambda turns: template(chat_messages(turns, multiturn)))
                         for i in range(len(self.docs))]
        self.target_delimiter = ""
        self.chat = {"fewshot_as_multiturn": multiturn}


def chat_renderer(tokenizer_dir: str, model: str):
    """(render, template): render(messages) is the text of the tokenizer's chat template with the
    generation prompt added, through transformers' `apply_chat_template` as the harness's HF backend
    does (a template that refuses the system role gets the messages without it, as there). The
    template is the Hugging Face one saved with the tokenizer (llmstack's tokenizers carry theirs,
    data_pipeline/formats.py). A tokenizer without one is a UsageError naming the model."""
    import transformers
    from jinja2 import TemplateError

    try:
        hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as e:  # files transformers cannot read: one message, whatever the cause
        raise UsageError(f"--apply-chat-template: transformers cannot load the tokenizer of {model} "
                         f"({tokenizer_dir}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    template = hf.chat_template
    if isinstance(template, dict):  # several named templates: the harness takes "default"
        template = template.get("default")
    if not template:
        raise UsageError(f"--apply-chat-template: the tokenizer of {model} ({tokenizer_dir}) has no chat template")

    def render(messages: list[dict]) -> str:
        try:
            try:
                return hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=True)
            except TemplateError:
                messages = [m for m in messages if m["role"] != "system"]
                return hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                              add_generation_prompt=True)
        except TemplateError as e:
            raise UsageError(f"--apply-chat-template: the chat template of {model} failed: {e}") from None

    return render, template


def _text(spec, doc, has_choices):
    return resolve(spec.doc_to_text, doc, "doc_to_text", has_choices)


def _answer(spec: TaskSpec, doc: dict) -> str | None:
    """The answer text of a few-shot example; None when it has none (an empty target: the harness
    then shows the question alone, with no delimiters)."""
    has_choices = spec.doc_to_choice is not None
    target = resolve(spec.doc_to_target, doc, "doc_to_target", has_choices)
    if target is None or target == "":
        return None
    if has_choices:
        choices = resolve(spec.doc_to_choice, doc, "doc_to_choice", True)
        text = _text(spec, doc, True)
        if isinstance(text, int):  # multiple inputs: the target is the shared continuation
            return str(target)
        if isinstance(target, int):
            return choices[target]
    if isinstance(target, list):
        return str(target[0])
    return str(target)


def _example_text(spec: TaskSpec, doc: dict) -> str:
    text = _text(spec, doc, spec.doc_to_choice is not None)
    if isinstance(text, int):  # multiple inputs: the example shows its gold context
        text = resolve(spec.doc_to_choice, doc, "doc_to_choice", True)[text]
    return str(text)


def prepare(spec: TaskSpec, base: Path, num_fewshot: int | None, seed: int, limit: int | None = None,
            system_instruction: str | None = None) -> Prepared:
    """Load the task's data and build every document's prompt (every rank does this identically).

    system_instruction: text before the task's description (joined by the few-shot delimiter),
    the system turn under a chat template, as the harness's --system_instruction."""
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    k = k or 0
    docs = load_split(spec, spec.test_split, base)
    if limit:
        docs = docs[:limit]
    if not docs:
        raise UsageError(f"task {spec.task}: split {spec.test_split!r} of {spec.dataset_path} has no samples")
    pool, pool_is_eval = [], False
    if k > 0:
        split = spec.fewshot_split or spec.training_split or spec.validation_split or spec.test_split
        pool_is_eval = split == spec.test_split
        pool = docs if pool_is_eval and not limit else load_split(spec, split, base)
        if len(pool) < k + pool_is_eval:
            raise UsageError(f"task {spec.task}: {k}-shot needs {k + pool_is_eval} few-shot documents, split "
                             f"{split!r} has {len(pool)}")
    rnd = random.Random(seed)
    has_choices = spec.doc_to_choice is not None
    turns, queries, choices, golds, multi, targets = [], [], [], [], [], []
    for i, doc in enumerate(docs):
        try:
            if not isinstance(doc, dict):
                raise DocError("a sample must be a mapping of fields")
            description = str(resolve(spec.description, doc, "description", False)) if spec.description else ""
            system = join_delimited(system_instruction, description, spec.fewshot_delimiter)
            shown = [Turn("system", system)] if system else []
            if k > 0:
                if spec.fewshot_config.sampler == "first_n":
                    shots = [d for j, d in enumerate(pool) if not (pool_is_eval and j == i)][:k]
                elif pool_is_eval:
                    idx = rnd.sample(range(len(pool)), k + 1)
                    shots = [pool[j] for j in idx if j != i][:k]
                else:
                    shots = rnd.sample(pool, k)
                for shot in shots:
                    answer = _answer(spec, shot)
                    if answer is None:
                        shown.append(Turn("user", _example_text(spec, shot)))
                    else:
                        shown += [Turn("user", _example_text(spec, shot), spec.target_delimiter),
                                  Turn("assistant", answer, spec.fewshot_delimiter)]
            text = _text(spec, doc, has_choices)
            target = resolve(spec.doc_to_target, doc, "doc_to_target", has_choices) \
                if spec.doc_to_target is not None or spec.output_type != "generate_until" else None
            chs = resolve(spec.doc_to_choice, doc, "doc_to_choice", True) if has_choices else None
            is_multi = isinstance(text, int) and chs is not None
            if spec.output_type == "multiple_choice":
                if not chs:
                    raise DocError("doc_to_choice gave no choices")
                if is_multi:
                    gold, query = text, list(chs)
                    if not isinstance(target, str):
                        raise DocError(f"doc_to_target: expected the continuation text, got {target!r}")
                else:
                    gold = chs.index(target) if isinstance(target, str) and target in chs else target
                    query = str(text)
                if not isinstance(gold, int) or not 0 <= gold < len(chs):
                    raise DocError(f"doc_to_target: {target!r} is neither a choice nor an index below {len(chs)}")
            else:
                gold = target
                query = str(text) if spec.output_type != "loglikelihood_rolling" else None
                if spec.output_type in ("loglikelihood", "loglikelihood_rolling") and not isinstance(gold, str):
                    raise DocError(f"doc_to_target: expected text, got {gold!r}")
        except DocError as e:
            raise UsageError(f"task {spec.task}: sample {i} of split {spec.test_split!r}: {e}") from None
        turns.append(shown)
        queries.append(query)
        choices.append(chs)
        golds.append(gold)
        multi.append(is_multi)
        targets.append(target if is_multi else None)
    return Prepared(spec, docs, turns, queries, choices, golds, multi, targets)
