"""`llmstack export | import | generate` as users type them, on a tiny trained GPT.

export -> transformers loads model and tokenizer from the directory alone and scores like us;
import -> the same weights bit for bit, the same generations, and a valid model.init; bad input
exits with status 2 and one message.
"""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from tests.conftest import pretrain, run_cmd

pytestmark = pytest.mark.slow


def cli(*args, cwd, check=True):
    return run_cmd([sys.executable, "-m", "llmstack", *args], cwd=cwd, check=check)


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("export")
    _, run_dir = pretrain(tmp, tokenizer_dir, "gpt", "train.max_steps=6", "zero.stage=0")
    return tmp, run_dir


@pytest.fixture(scope="module")
def exported(gpt_run):
    tmp, run_dir = gpt_run
    out = tmp / "hf-gpt"
    proc = cli("export", str(run_dir / "checkpoints" / "latest"), "--out", str(out), cwd=tmp)
    assert f"wrote {out}" in proc.stdout
    return out


def test_export_loads_in_transformers_with_its_tokenizer(gpt_run, exported):
    import transformers as tf

    from llmstack.train.weights import load_for_inference

    _, run_dir = gpt_run
    ours, tok, _ = load_for_inference(run_dir)
    theirs = tf.AutoModelForCausalLM.from_pretrained(exported).eval()
    hf_tok = tf.AutoTokenizer.from_pretrained(exported)
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    text = "Return a new list containing all items from the iterable in ascending order."
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(text) and hf_tok.decode(ids[0]) == text
    assert (hf_tok.pad_token_id, hf_tok.eos_token_id) == (tok.pad_id, tok.eos_id) == (0, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_import_round_trip_generate_and_init(gpt_run, exported, tokenizer_dir):
    from llmstack.train.weights import read_weights

    tmp, run_dir = gpt_run
    imported = tmp / "imported"
    cli("import", str(exported), "--out", str(imported), cwd=tmp)
    _, info, state = read_weights(imported)
    _, _, orig = read_weights(run_dir)
    assert info.model_family == "gpt" and set(state) == set(orig) - {"lm_head.weight"}
    assert all(torch.equal(state[k], orig[k]) for k in state)

    # the same greedy continuation from the checkpoint, the imported dir and the HF dir itself
    args = ["--prompt", "def ", "--prompt", "Return the", "--max-new-tokens", "12", "--temperature", "0"]
    outs = [cli("generate", str(src), *args, cwd=tmp).stdout for src in (run_dir, imported, exported)]
    assert outs[0] == outs[1] == outs[2] and outs[0].count("--- prompt:") == 2
    sampled = cli("generate", str(run_dir / "checkpoints" / "latest"), "--prompt", "def ", "--max-new-tokens", "16",
                  "--top-p", "0.9", "--seed", "3", cwd=tmp).stdout
    assert sampled.startswith("--- prompt: 'def '")

    # an imported model is a valid starting point for training (same tokenizer)
    proc, _ = pretrain(tmp, tokenizer_dir, "from-imported", "train.max_steps=1", f"model.init={imported}")
    assert f"initialised weights from {imported}" in proc.stdout


def test_export_refuses_architecture_without_hf_equivalent(tmp_path, tokenizer_dir):
    _, run_dir = pretrain(tmp_path, tokenizer_dir, "nobias", "train.max_steps=1", "zero.stage=0", "model.bias=false")
    proc = cli("export", str(run_dir), "--out", str(tmp_path / "out"), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.bias=false" in proc.stderr and "GPT2LMHeadModel" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_input_exits_2(gpt_run, exported, tmp_path):
    import transformers as tf

    bert_dir = tmp_path / "hf-bert"
    tf.BertForMaskedLM(tf.BertConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)).save_pretrained(bert_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(exported / name, bert_dir / name)
    (tmp_path / "empty").mkdir()
    cases = [
        (["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "checkpoint not found"),
        (["import", str(tmp_path / "empty"), "--out", str(tmp_path / "o")], "no config.json"),
        (["generate", str(bert_dir), "--prompt", "x"], "generation needs a gpt or t5 model"),
        (["generate", str(exported), "--prompt", "x", "--top-p", "0"], "--top-p 0.0 is out of range"),
        (["generate", str(exported), "--prompt", "x", "--max-new-tokens", "500"], "exceeds the model's max_seq_len"),
        (["generate", str(exported), "--prompt", "x", "--stop", "two words"], "a stop must be a single token"),
    ]
    for args, needle in cases:
        proc = cli(*args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_help(tmp_path):
    for cmd in ("export", "import", "generate"):
        proc = cli(cmd, "--help", cwd=tmp_path)
        assert proc.returncode == 0 and "usage:" in proc.stdout


def tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_out_never_replaces_a_run_directory(gpt_run, exported):
    """--out naming a run directory (checkpoints inside) is refused by every command, with or
    without --overwrite, and the directory is left byte for byte as it was."""
    tmp, run_dir = gpt_run
    victim = tmp / "victim-run"
    shutil.copytree(run_dir, victim)
    before = tree(victim)
    for args in (["checkpoint", "consolidate", str(run_dir)], ["export", str(run_dir)], ["import", str(exported)],
                 ["export", str(run_dir), "--overwrite"]):
        proc = cli(*args, "--out", str(victim), cwd=tmp, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])
        assert ("refusing to overwrite" if "--overwrite" in args else "pass --overwrite") in proc.stderr
    assert tree(victim) == before


def test_overwrite_swaps_in_a_complete_export_only(gpt_run):
    tmp, run_dir = gpt_run
    out = tmp / "hf-again"
    cli("export", str(run_dir), "--out", str(out), cwd=tmp)
    cli("export", str(run_dir), "--out", str(out), "--overwrite", "--dtype", "bf16", cwd=tmp)
    assert '"dtype": "bfloat16"' in (out / "config.json").read_text()
    before = tree(out)
    bad = cli("export", str(run_dir), "--out", str(out), "--overwrite", "--max-shard-size", "lots", cwd=tmp, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert tree(out) == before  # the failed run left the previous export as it was
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name]
