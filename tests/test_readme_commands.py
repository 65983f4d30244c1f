"""Every command in README.md's shell blocks, run the way a new user on a fresh clone runs it.

Commands are read from the fenced ```bash / ```sh / ```console blocks (continuation lines joined,
comments dropped, the `$ ` prompt of console blocks stripped, other console lines are output) and
each must have an entry in COMMANDS, keyed by its text: a README command without one fails
`test_every_readme_command_is_classified` (and its own test), so a new command gets classified
when it is added. They run in README order in one scratch copy of the repository (outputs stay
out of the tree; later commands use earlier ones' outputs, as a reader's would). Classes:

- RUN: run as written; it must succeed. Placeholders (CONFIG, runs/x, ...) are filled in as the
  entry says, and what a user would already have (their Hugging Face model, their task file, a
  run of another stage) is put in place first: `prepare`, named in the entry.
- ERROR: needs the network, a GPU or other nodes: run as written, it must fail as the command-line
  contract says: exit status 2, one line naming the problem, no traceback.
- DRY: long training: run with --dry-run appended (the config, its paths and the batch
  arithmetic). A launcher line (deepspeed, torchrun, launch/*.sh, sbatch) would start N processes
  on GPUs or other nodes: its llmstack command runs with --dry-run in one process whose WORLD_SIZE
  is N, which checks the batch arithmetic at that size; the launchers themselves run in
  tests/distributed. `llmstack pretrain configs/pretrain/gpt-tiny.yaml` also trains, shrunk to a
  few seconds (SHRINK): the one checkpoint every later command reads (runs/gpt-tiny).
- SKIP: cannot run here at all, or only for minutes; the entry's `instead` runs in its place.

`llmstack` commands run in this process through the console script's entry function, with the
argv bash makes of the line (starting Python, torch and DeepSpeed some forty times would take
minutes); training, `llmstack-eval` (its table goes to the sys.stdout of its first import),
launchers and other programs run as subprocesses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env

README = REPO / "README.md"
SHELL_FENCE = re.compile(r"^```(bash|sh|shell|console)\s*$")
# The fixture checkpoint: gpt-tiny.yaml's run (runs/gpt-tiny), two steps of a one-layer model.
SHRINK = ["model.n_layer=1", "model.n_head=2", "model.d_model=64", "data.seq_len=256", "train.micro_batch=2",
          "train.max_steps=2", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
          "train.warmup_steps=1", "train.progress=false", "dist.timeout_s=120"]
TRAINED = "runs/gpt-tiny/checkpoints/latest"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- reading the README ---------------------------------------------------------------------------


def strip_comment(line: str) -> str:
    """The line without its shell comment: a `#` at a word start outside quotes."""
    quote, i = None, 0
    while i < len(line):
        c = line[i]
        if quote == "'":
            quote = None if c == "'" else quote
        elif c == "\\":
            i += 1  # the next character is escaped (outside single quotes)
        elif quote == '"':
            quote = None if c == '"' else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def readme_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for every command of the shell blocks, in order."""
    out, lang, pending = [], None, None
    for n, line in enumerate(text.splitlines(), 1):
        if lang is None:
            if m := SHELL_FENCE.match(line):
                lang = m.group(1)
            continue
        if line.startswith("```"):
            lang, pending = None, None
            continue
        if pending is None:
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # output
                line = line[2:]
            code = strip_comment(line).strip()
            if not code:
                continue
            pending = (n, code)
        else:  # a continuation line
            pending = (pending[0], pending[1][:-1].rstrip() + " " + strip_comment(line).strip())
        if not pending[1].endswith("\\"):
            out.append(pending)
            pending = None
    return out


# --- how each command is run ----------------------------------------------------------------------


@dataclass(frozen=True)
class How:
    kind: str  # RUN | ERROR | DRY | SKIP
    why: str = ""  # why it is not simply run (ERROR, DRY, SKIP), or what stands in for what
    expect: str = ""  # RUN / DRY / SKIP: a regex the output must match; ERROR: the one error line's
    fill: tuple[tuple[str, str], ...] = ()  # placeholder -> value, in the command text
    prepare: tuple = ()  # ((Scratch method, *args), ...): what the user has in place before the command
    after: tuple = ()  # (Scratch method, *args): the user's step after it (editing a copied file)
    inner: str = ""  # DRY of a launch script: the llmstack command it starts
    world: int | str = 0  # DRY of a launch script: its processes, or the hostfile that counts them
    also: str = ""  # a quick check that must pass too (a script's syntax)
    instead: str = ""  # SKIP: what runs in its place
    rc: tuple[int, ...] = (0,)
    train: bool = False  # DRY: also train the fixture checkpoint with this command (+ SHRINK)


def RUN(expect="", **kw):
    return How("RUN", expect=expect, **kw)


def ERROR(expect, why, **kw):
    return How("ERROR", expect=expect, why=why, **kw)


def DRY(why, **kw):
    return How("DRY", why=why, **kw)


def SKIP(why, instead, expect="", **kw):
    return How("SKIP", why=why, instead=instead, expect=expect, **kw)


LONG = "trains for minutes to days"
GPUS = "the launcher starts one process per GPU (or, on CPU, as many CPU processes: slow on a small machine)"
NODES = "starts processes on the hostfile's nodes over ssh (pdsh), which this machine cannot reach"
WAITS = "one node of a multi-node job: it waits at MASTER_ADDR for the others"
STANDIN = "the fixture checkpoint (runs/gpt-tiny) stands in for that stage's output, which its DRY line checks"
STAGE_INIT = (("model.init=...", "model.init=" + TRAINED),)

COMMANDS: dict[str, How] = {
    # Quickstart
    "make demo": DRY("installs into .venv, then runs the 7-minute quickstart (tests/test_quickstart.py runs it)",
                     expect=r"llmstack quickstart"),
    "make test": DRY("runs the whole test suite, this file included", expect=r"pytest -q tests"),
    # Commands
    "llmstack tokenizer train configs/tokenizer/bpe-demo.yaml": RUN(r"tokenizer: 8192 tokens"),
    "llmstack pretrain configs/pretrain/gpt-tiny.yaml train.max_steps=200 --dry-run": RUN(r"max_steps: 200"),
    "llmstack pretrain configs/pretrain/gpt-tiny.yaml": DRY(LONG, train=True),
    "llmstack pretrain configs/pretrain/llama-tiny.yaml": DRY(LONG),
    "llmstack pretrain configs/pretrain/bert-tiny.yaml": DRY(LONG),
    "llmstack pretrain configs/pretrain/t5-tiny.yaml": DRY(LONG),
    "llmstack export runs/gpt-tiny/checkpoints/latest --out hf/gpt-tiny": RUN(r"wrote hf/gpt-tiny"),
    "llmstack import hf/some-llama --out checkpoints/imported": RUN(
        r"wrote checkpoints/imported", prepare=(("hf_llama", "hf/some-llama"),),
        why="hf/some-llama: a tiny LlamaForCausalLM saved by transformers stands in for the user's model"),
    'llmstack generate runs/gpt-tiny/checkpoints/latest --prompt "def " --max-new-tokens 64 --top-p 0.9': RUN(r"def "),
    "deepspeed --num_gpus 2 --module llmstack pretrain configs/pretrain/gpt-tiny.yaml zero.stage=3": DRY(GPUS),
    "torchrun --nproc_per_node 2 -m llmstack pretrain configs/pretrain/gpt-tiny.yaml zero.stage=2": DRY(GPUS),
    "llmstack data prepare configs/data/demo.yaml": RUN(r"wrote \d+ shards"),
    "llmstack data inspect runs/shards/demo": RUN(r"documents", prepare=(("shards",),)),
    "llmstack pretrain configs/pretrain/gpt-tiny.yaml data.sources='[{path: runs/shards/demo}]' "
    "run.name=gpt-tiny-shards": DRY(LONG),
    "llmstack pretrain configs/pretrain/gpt-tiny.yaml run.name=gpt-tiny-mix data.sources='[{path: "
    '"corpus/*.jsonl.zst", weight: 0.7}, {path: "hf:wikitext:wikitext-103-raw-v1:train", weight: 0.3}]\'': ERROR(
        r"^error: data source not found: no files match corpus/\*\.jsonl\.zst$",
        "needs the user's corpus/ files and the network (hf:wikitext)"),
    "cp launch/hostfile.example launch/hostfile": RUN(after=("edit_hostfile",)),
    "deepspeed --hostfile launch/hostfile --module llmstack pretrain configs/pretrain/gpt-1.3b.yaml": DRY(NODES),
    # Scale out
    "llmstack plan configs/pretrain/gpt-1.3b.yaml --gpus 16 --gpu-mem 80": RUN(r"ZeRO-3"),
    # the edited hostfile names this machine: a real probe; rc 1 only if another run holds port 29500
    "llmstack preflight --hostfile launch/hostfile": RUN(r"preflight: ok|rendezvous port is in use", rc=(0, 1)),
    "bash launch/deepspeed_multinode.sh launch/hostfile configs/pretrain/gpt-1.3b.yaml": DRY(
        NODES, inner="llmstack pretrain configs/pretrain/gpt-1.3b.yaml", world="launch/hostfile",
        also="bash -n launch/deepspeed_multinode.sh"),
    "NO_SSH=1 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/deepspeed_multinode.sh launch/hostfile CONFIG": DRY(
        WAITS, inner="llmstack pretrain configs/pretrain/gpt-1.3b.yaml", world="launch/hostfile"),
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh 8 CONFIG": DRY(
        WAITS, inner="llmstack pretrain configs/pretrain/gpt-1.3b.yaml", world=16, also="bash -n launch/torchrun.sh"),
    "sbatch launch/slurm.sbatch configs/pretrain/gpt-1.3b.yaml": DRY(
        "needs SLURM; the script asks for 2 nodes x 8 GPUs", inner="llmstack pretrain configs/pretrain/gpt-1.3b.yaml",
        world=16, also="bash -n launch/slurm.sbatch"),
    "llmstack checkpoint reshape runs/x/checkpoints/latest": RUN(
        r"wrote runs/gpt-tiny/checkpoints/step_2_universal", fill=(("runs/x/", "runs/gpt-tiny/"),)),
    "llmstack pretrain CONFIG train.resume=runs/x/checkpoints/step_N_universal": DRY(LONG, fill=(
        ("CONFIG", "configs/pretrain/gpt-tiny.yaml"), ("runs/x/", "runs/gpt-tiny/"), ("step_N", "step_2"))),
    "llmstack sft configs/sft/gpt-tiny-demo.yaml model.init=hf/some-olmo2 model.backend=hf tokenizer.path= "
    "sft.packing=false lora.enabled=true lora.target='[q_proj,v_proj]'": DRY(LONG),
    # SFT
    "llmstack sft configs/sft/gpt-tiny-demo.yaml model.init=runs/gpt-tiny/checkpoints/latest": DRY(LONG),
    "llmstack sft configs/sft/lora.yaml model.init=runs/gpt-tiny/checkpoints/latest lora.r=16 "
    "lora.target='[q,v]'": DRY(LONG),
    "deepspeed --num_gpus 2 --module llmstack sft configs/sft/gpt-tiny-demo.yaml zero.stage=3 model.init=...": DRY(
        GPUS, fill=STAGE_INIT),
    'llmstack generate runs/sft-demo/checkpoints/latest --chat "What does \\`json.dumps\\` do?" --temperature 0': RUN(
        prepare=(("standin", "sft-demo"),), why=STANDIN),
    "llmstack export runs/sft-lora/checkpoints/latest --out hf/sft-lora": RUN(
        r"wrote hf/sft-lora", prepare=(("standin", "sft-lora"),), why=STANDIN),
    # RLHF
    "llmstack rm  configs/rm/demo.yaml  model.init=runs/sft-demo/checkpoints/latest": DRY(LONG),
    "llmstack ppo configs/ppo/demo.yaml actor.init=runs/sft-demo/checkpoints/latest "
    "reward.init=runs/rm-demo/checkpoints/latest": DRY(LONG),
    "llmstack ppo configs/ppo/demo.yaml reward.init=null reward.function=llmstack.rlhf.rewards:contains "
    "reward.kwargs='{target: Return}'": DRY(LONG),
    "llmstack dpo configs/dpo/demo.yaml model.init=runs/sft-demo/checkpoints/latest": DRY(LONG),
    "deepspeed --num_gpus 8 --module llmstack ppo configs/ppo/demo.yaml actor.zero.stage=2 critic.zero.stage=2 "
    "reference.zero.stage=3": DRY(GPUS),
    'llmstack generate runs/ppo-demo/checkpoints/actor/latest --chat "What does \\`json.dumps\\` do?"': RUN(
        prepare=(("standin", "ppo-demo", "actor"),), why=STANDIN),
    "llmstack grpo configs/grpo/demo.yaml actor.init=runs/sft-demo/checkpoints/latest": DRY(LONG),
    "llmstack grpo configs/grpo/demo.yaml grpo.algo=dr_grpo grpo.clip_high=0.28 grpo.dynamic_sampling=true": DRY(LONG),
    # Evaluation
    "llmstack-eval --model runs/gpt-tiny/checkpoints/latest --tasks ppl:builtin:validation,demo_mc "
    "--num-fewshot 5": RUN(r"demo_mc\s+acc"),
    "llmstack-eval --model hf/gpt-tiny --tasks eval/tasks/my_task.yaml --output results.json --log-samples": RUN(
        r"my_task\s+acc", prepare=(("exported",), ("my_task", "eval/tasks/my_task.yaml")),
        why="eval/tasks/my_task.yaml: a four-question multiple-choice task stands in for the user's"),
    "llmstack-eval --config configs/eval/demo.yaml --model runs/gpt-tiny/checkpoints/latest": RUN(
        r"wrote eval-results\.json"),
    "deepspeed --num_gpus 8 --module eval --model ... --tasks ...": SKIP(
        GPUS + "; placeholders only; data-parallel eval runs in tests/distributed/test_eval_dp.py",
        instead=f"llmstack-eval --model {TRAINED} --tasks demo_mc --limit 8", expect=r"demo_mc\s+acc"),
    "llmstack-eval harness --model llmstack --model_args checkpoint=runs/gpt-tiny/checkpoints/latest "
    "--tasks hellaswag": ERROR(r"^error: task hellaswag needs the network", "hellaswag is downloaded from the Hub"),
    "llmstack-eval --model M --tasks list": RUN(r"demo_mc"),
    # GPU check
    "make gpu-wheels": DRY("downloads wheels (network)", expect=r"pip download"),
    "bash bench/gpu_check.sh": ERROR(r"^ABORT: no Python whose torch sees a CUDA device",
                                     "needs a GPU (CUDA hidden from it here)"),
    "bash bench/gpu_check.sh --cpu-smoke": SKIP("4-10 minutes on 2 cores", instead="bash bench/gpu_check.sh --help",
                                                expect=r"--cpu-smoke"),
}


# --- the scratch copy and what the commands find there -------------------------------------------


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _repo_files() -> list[str]:
    """The repository's files as a fresh clone has them (tracked and new, not ignored)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
        return [f for f in out.split("\0") if f and (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        top = {".git", ".venv", "runs", "hf", "data", "checkpoints", "wheels", "build", "dist"}
        return [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()
                and p.relative_to(REPO).parts[0] not in top and "__pycache__" not in p.parts]


def shell_syntax(cmd: str) -> bool:
    """Whether the line has more than words: pipes, lists, redirections, substitutions."""
    return bool(re.search(r"[|;&<>`$()]", re.sub(r"'[^']*'|\"(?:[^\"\\]|\\.)*\"", "", cmd)))


def bash_words(cmd: str) -> list[str]:
    """The argv bash makes of a command line of plain words (quotes, escapes), without running it."""
    assert not shell_syntax(cmd), f"not plain words: {cmd}"
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + cmd], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


class Scratch:
    """A copy of the repository where the README's commands run, and their outputs stay."""

    def __init__(self, root: Path):
        self.root = root
        self.env = child_env(CUDA_VISIBLE_DEVICES="", **OFFLINE)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def shell(self, cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def inproc(self, argv: list[str], capfd, world: int | None = None) -> tuple[int, str, str]:
        """An `llmstack` command line through its console script's function."""
        from llmstack import cli

        assert argv[0] == "llmstack", argv
        # DeepSpeed's log handler still holds the stderr of an earlier test's capture, now closed
        # (a process runs one command; this one runs many): point it at this test's
        for h in logging.getLogger("DeepSpeed").handlers:
            if type(h) is logging.StreamHandler and getattr(h.stream, "closed", False):
                h.stream = sys.stderr
        capfd.readouterr()
        saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", *OFFLINE)}
        os.environ.update(OFFLINE)
        if world:
            os.environ["WORLD_SIZE"] = str(world)
        try:
            with _cwd(self.root):
                try:
                    rc = cli.main(argv[1:])
                except SystemExit as e:  # argparse
                    rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        out, err = capfd.readouterr()
        return rc, out, err

    def execute(self, cmd: str, capfd, world: int | None = None) -> tuple[int, str, str]:
        if not shell_syntax(cmd) and (argv := bash_words(cmd))[0] == "llmstack":
            return self.inproc(argv, capfd, world)
        assert world is None, cmd
        proc = self.shell(cmd)
        return proc.returncode, proc.stdout, proc.stderr

    # what the commands expect to find (each makes it only if missing, so any test can run alone)

    def tokenizer(self, capfd) -> None:
        if not self.path("runs/tokenizers/bpe-8k/tokenizer.json").is_file():
            rc, out, err = self.inproc(bash_words("llmstack tokenizer train configs/tokenizer/bpe-demo.yaml"), capfd)
            assert rc == 0, out + err

    def trained(self, capfd) -> None:
        """runs/gpt-tiny: README's `llmstack pretrain configs/pretrain/gpt-tiny.yaml`, shrunk (SHRINK)."""
        if self.path(TRAINED).is_file():
            return
        self.tokenizer(capfd)
        proc = self.shell("llmstack pretrain configs/pretrain/gpt-tiny.yaml " + " ".join(SHRINK))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        assert self.path("runs/gpt-tiny/checkpoints/step_2").is_dir()

    def standin(self, capfd, name: str, sub: str = "") -> None:
        """runs/NAME/checkpoints[/SUB]/: a copy of the fixture checkpoint, as another stage's run."""
        self.trained(capfd)
        root = self.path(f"runs/{name}/checkpoints") / sub
        if not (root / "latest").is_file():
            shutil.copytree(self.path("runs/gpt-tiny/checkpoints/step_2"), root / "step_2")
            (root / "latest").write_text("step_2")

    def hf_llama(self, capfd, rel: str) -> None:
        """A tiny LlamaForCausalLM with the demo tokenizer, as transformers saves it."""
        from transformers import LlamaConfig, LlamaForCausalLM

        self.tokenizer(capfd)
        out = self.path(rel)
        if (out / "config.json").is_file():
            return
        tok = self.path("runs/tokenizers/bpe-8k")
        cfg = LlamaConfig(vocab_size=8192, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
        LlamaForCausalLM(cfg).save_pretrained(out)
        for f in tok.iterdir():
            if f.is_file() and f.name not in ("config.json",):
                shutil.copy2(f, out / f.name)

    def my_task(self, capfd, rel: str) -> None:
        """A multiple-choice task in lm-evaluation-harness's format, its data beside it."""
        spec = self.path(rel)
        data = spec.with_suffix(".jsonl")
        docs = [("The capital of France is", ["Paris", "a spoon", "blue", "seven"], 0),
                ("Water freezes at zero degrees", ["loudly", "Celsius", "Tuesday", "up"], 1),
                ("def f(x): return", ["x", "the moon", "yes", "quickly"], 0),
                ("import os; os.path.", ["join", "banana", "red", "never"], 0)]
        data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": lab}) + "\n" for c, ch, lab in docs))
        spec.write_text(f"task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
                        "doc_to_target: label\ndoc_to_choice: choices\ntarget_delimiter: \" \"\n"
                        "metric_list:\n  - metric: acc\n")

    def slots(self, hostfile: str) -> int:
        """Processes a launch with this hostfile starts: its slots (a missing file fails here, as
        a README that used it before saying how to make it would)."""
        from llmstack.distributed.preflight import parse_hostfile

        return sum(n for _, n in parse_hostfile(self.path(hostfile)))

    def exported(self, capfd) -> None:
        """hf/gpt-tiny: README's export of the fixture checkpoint."""
        if not self.path("hf/gpt-tiny/config.json").is_file():
            self.trained(capfd)
            rc, out, err = self.inproc(bash_words(f"llmstack export {TRAINED} --out hf/gpt-tiny"), capfd)
            assert rc == 0, out + err

    def shards(self, capfd) -> None:
        """runs/shards/demo: README's `llmstack data prepare configs/data/demo.yaml`."""
        if not self.path("runs/shards/demo/manifest.json").is_file():
            self.tokenizer(capfd)
            rc, out, err = self.inproc(bash_words("llmstack data prepare configs/data/demo.yaml"), capfd)
            assert rc == 0, out + err

    def edit_hostfile(self, capfd) -> None:
        """What the README asks after copying the example: list the nodes; here, this machine."""
        self.path("launch/hostfile").write_text("localhost slots=1\n")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Scratch:
    root = tmp_path_factory.mktemp("readme")
    for rel in _repo_files():
        dst = root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    assert not (root / "launch" / "hostfile").exists()  # a fresh clone has only the example
    return Scratch(root)


# --- the tests ------------------------------------------------------------------------------------

COMMAND_LIST = readme_commands(README.read_text())


def test_every_readme_command_is_classified():
    listed = {c for _, c in COMMAND_LIST}
    missing = [f"README.md:{n}: {c}" for n, c in COMMAND_LIST if c not in COMMANDS]
    assert not missing, "README commands without an entry in COMMANDS (say how to test them):\n" + "\n".join(missing)
    stale = [c for c in COMMANDS if c not in listed]
    assert not stale, "COMMANDS entries no README command has (changed or removed?):\n" + "\n".join(stale)
    for c, how in COMMANDS.items():
        assert how.kind in ("RUN", "ERROR", "DRY", "SKIP"), c
        assert how.kind == "RUN" or how.why, f"{c}: say why it is not simply run"


def test_extraction_handles_continuations_comments_and_console():
    text = ("```bash\nllmstack a x='# not a comment' \\\n    y=1   # a comment\n# only a comment\n\n"
            "echo \"a # b\" c # d\n```\n```python\nnot_shell()\n```\n```console\n$ llmstack b\noutput\n```\n")
    assert readme_commands(text) == [(2, "llmstack a x='# not a comment' y=1"), (6, 'echo "a # b" c'),
                                     (12, "llmstack b")]


def _launcher(argv: list[str], scratch: Scratch) -> tuple[list[str], int] | None:
    """(the llmstack command, its process count) of a deepspeed / torchrun line, else None."""
    def opt(name, default=None):
        return argv[argv.index(name) + 1] if name in argv else default

    if argv[0] == "deepspeed" and "--module" in argv:
        i, prog = argv.index("--module"), {"llmstack": "llmstack", "eval": "llmstack-eval"}[opt("--module")]
        world = scratch.slots(opt("--hostfile")) if "--hostfile" in argv else int(opt("--num_gpus", 1))
        return [prog, *argv[i + 2:]], world
    if argv[0] == "torchrun" and "-m" in argv:
        i = argv.index("-m")
        return ["llmstack", *argv[i + 2:]], int(opt("--nproc_per_node", 1)) * int(opt("--nnodes", 1))
    return None


def _check_dry(rc: int, out: str, err: str, world: int | None, what: str) -> None:
    assert rc == 0, f"{what}: exit {rc}\n{out[-2000:]}\n{err[-3000:]}"
    assert "# resolved config" in out, f"{what}: no resolved config printed\n{out[-2000:]}"
    if world and "# deepspeed config" in out:
        assert f"# deepspeed config (world size {world})" in out, what


@pytest.mark.parametrize("line,cmd", COMMAND_LIST, ids=[f"L{n}-{' '.join(c.split()[:3])}" for n, c in COMMAND_LIST])
def test_readme_command(scratch: Scratch, line: int, cmd: str, capfd):
    how = COMMANDS.get(cmd)
    if how is None:
        pytest.fail(f"README.md:{line}: `{cmd}` is not classified: add it to COMMANDS")
    for placeholder, value in how.fill:
        assert placeholder in cmd, f"{placeholder!r} not in {cmd!r}"
        cmd = cmd.replace(placeholder, value)
    for step in how.prepare:
        getattr(scratch, step[0])(capfd, *step[1:])
    if "runs/gpt-tiny/" in cmd and how.kind == "RUN":  # run in isolation: the fixture checkpoint first
        scratch.trained(capfd)
    what = f"README.md:{line}: {cmd}"

    if how.kind == "RUN":
        rc, out, err = scratch.execute(cmd, capfd)
        assert rc in how.rc, f"{what}: exit {rc}\n{out[-2000:]}\n{err[-4000:]}"
        assert "Traceback" not in err, f"{what}\n{err[-4000:]}"
        assert re.search(how.expect, out + err), f"{what}: no match for {how.expect!r}\n{out[-2000:]}\n{err[-2000:]}"
    elif how.kind == "ERROR":
        rc, out, err = scratch.execute(cmd, capfd)
        lines = [ln for ln in (out + "\n" + err).splitlines() if re.search(how.expect, ln)]
        assert rc == 2 and len(lines) == 1, f"{what}: exit {rc}, {len(lines)} lines match\n{out[-2000:]}\n{err[-4000:]}"
        assert "Traceback" not in out + err, f"{what}\n{err[-4000:]}"
    elif how.kind == "DRY":
        argv = bash_words(cmd)
        if how.inner:  # a launch script: its llmstack command, at its world size
            world = scratch.slots(how.world) if isinstance(how.world, str) else how.world
            rc, out, err = scratch.inproc(bash_words(how.inner) + ["--dry-run"], capfd, world)
            _check_dry(rc, out, err, world, what)
        elif (launch := _launcher(argv, scratch)) is not None:
            inner, world = launch
            rc, out, err = scratch.inproc(inner + ["--dry-run"], capfd, world)
            _check_dry(rc, out, err, world, what)
        elif argv[0] == "llmstack":
            rc, out, err = scratch.inproc(argv + ["--dry-run"], capfd)
            _check_dry(rc, out, err, None, what)
        else:  # make: its own --dry-run prints the commands it would run
            rc, out, err = scratch.execute(cmd + " --dry-run", capfd)
            assert rc == 0 and re.search(how.expect, out), f"{what}: exit {rc}\n{out[-2000:]}\n{err[-2000:]}"
        if how.train:
            scratch.trained(capfd)
    else:  # SKIP
        rc, out, err = scratch.execute(how.instead, capfd)
        assert rc == 0 and re.search(how.expect, out + err), f"{how.instead}: exit {rc}\n{out[-2000:]}\n{err[-3000:]}"
    if how.also:
        proc = scratch.shell(how.also)
        assert proc.returncode == 0, f"{how.also}\n{proc.stderr}"
    if how.after:
        getattr(scratch, how.after[0])(capfd, *how.after[1:])


# --- what the README's commands promise beyond running ---------------------------------------------


def test_missing_hostfile_is_refused_naming_the_example(scratch: Scratch, capfd):
    """A fresh clone has launch/hostfile.example only: preflight and the multi-node script stop with
    exit 2 and a message naming the file and how to make it (never a traceback, never a launch)."""
    missing = "launch/no-such-hostfile"
    rc, out, err = scratch.inproc(["llmstack", "preflight", "--hostfile", missing], capfd)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert f"hostfile not found: {missing}" in err and f"cp launch/hostfile.example {missing}" in err
    proc = scratch.shell(f"bash launch/deepspeed_multinode.sh {missing} configs/pretrain/gpt-1.3b.yaml")
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith(f"error: hostfile not found: {missing}") and proc.stderr.count("\n") == 1
    assert "cp launch/hostfile.example" in proc.stderr
    if (REPO / ".git").exists():  # the copy a user makes is not committed by accident
        assert subprocess.run(["git", "check-ignore", "-q", "launch/hostfile"], cwd=REPO).returncode == 0


def test_other_data_in_an_existing_run_suggests_run_name(scratch: Scratch, capfd):
    """The shards example without its own run.name lands in runs/gpt-tiny, whose checkpoint was made
    with other data: refused (exit 2) with the way out, run.name=NEW_NAME."""
    scratch.trained(capfd)
    proc = scratch.shell("llmstack pretrain configs/pretrain/gpt-tiny.yaml "
                         "data.sources='[{path: builtin:validation}]' " + " ".join(SHRINK))
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-4000:]
    assert "the data changed since the checkpoint" in errors[0] and "run.name=NEW_NAME" in errors[0]
    assert "runs/gpt-tiny holds a run with other settings" in errors[0]


def test_ppo_run_directory_means_its_actor(scratch: Scratch, capfd, monkeypatch):
    """generate, export and llmstack-eval given a PPO run directory (or its checkpoints/latest) use
    the actor's newest checkpoint and say so, instead of failing."""
    from llmstack.train import checkpoint

    scratch.standin(capfd, "ppo-demo", "actor")
    for argv, expect in ((["llmstack", "generate", "runs/ppo-demo/checkpoints/latest", "--prompt", "def",
                           "--max-new-tokens", "4"], "def"),
                         (["llmstack", "export", "runs/ppo-demo", "--out", "hf/ppo-demo", "--overwrite"], "wrote"),
                         (["llmstack-eval", "--model", "runs/ppo-demo", "--tasks", "demo_mc", "--limit", "4"],
                          "demo_mc")):
        monkeypatch.setattr(checkpoint, "_noted", set())  # each command is its own process for a user
        rc, out, err = scratch.execute(shlex.join(argv), capfd)
        assert rc == 0 and expect in out, f"{argv}: exit {rc}\n{out[-2000:]}\n{err[-3000:]}"
        assert "holds PPO checkpoints: using the actor's, runs/ppo-demo/checkpoints/actor/step_2" in err, err
