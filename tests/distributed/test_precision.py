"""Correct at the settings users train with: bf16 and fp32 under every ZeRO stage, ZeRO-3 starting
from existing weights (tied and untied), and a rotary model trained in bf16 under ZeRO-3 whose
long-context logits match transformers.

Real launches: tests/distributed/precision_matrix.py and tests/distributed/init_logits.py run as ranks of the
deepspeed launcher (two processes) and as one plain process.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.conftest import BIN, REPO, TINY, free_port, pretrain, run_cmd

pytestmark = pytest.mark.slow

FAMILIES = ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"]
STAGES = ["0", "1", "2", "3"]
# Relative tolerance of a bf16 loss against the fp32 one: the loss is a mean over 256 positions of
# values computed from bf16 weights and activations (unit roundoff 2^-8 = 3.9e-3), so its error is
# well under one ulp; a third of an ulp is the bound used here.
BF16_REL = 1.3e-3
# Later steps (after optimizer updates) within one precision: fp32 runs differ only by summation
# order. In bf16, ZeRO-0 runs DeepSpeed's bf16 optimizer wrapper on bf16 gradients while ZeRO 1-3
# keep fp32 gradients, and the updated weights are rounded to bf16 again: one bf16 ulp (2^-8).
LATER_REL = {"fp32": 1e-5, "bf16": 2.0 ** -8}


def launch(script: str, args: list[str], nprocs: int, cwd) -> None:
    if nprocs == 1:
        run_cmd([sys.executable, str(REPO / script), *args], cwd=cwd)
    else:
        run_cmd([str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(free_port()),
                 str(REPO / script), *args], cwd=cwd)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    out = {}
    for n in (1, 2):
        launch("tests/distributed/precision_matrix.py", ["--out", str(tmp / f"{n}.json"), "--steps", "3"], n, tmp)
        out[n] = json.loads((tmp / f"{n}.json").read_text())
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_zero_stage_equals_zero0_in_the_same_precision(matrix, family):
    for n, res in matrix.items():
        for precision in ("fp32", "bf16"):
            runs = res[family][precision]
            ref = runs["0"]
            for stage in STAGES[1:]:
                got = runs[stage]
                where = f"{family} {precision} ZeRO-{stage}, {n} process(es)"
                # same initial weights (as trained: after the engine's cast) and the same first forward
                assert got["weights"] == ref["weights"], where
                assert got["losses"][0] == ref["losses"][0], where
                for step, (a, b) in enumerate(zip(got["losses"][1:], ref["losses"][1:]), start=2):
                    assert rel(a, b) <= LATER_REL[precision], f"{where} step {step}: {a} vs {b}"


@pytest.mark.parametrize("family", FAMILIES)
def test_first_step_losses_equal_the_single_process_fp32_run(matrix, family):
    ref = matrix[1][family]["fp32"]["0"]["losses"][0]
    for n, res in matrix.items():
        for precision in ("fp32", "bf16"):
            for stage in STAGES:
                got = res[family][precision][stage]["losses"][0]
                tol = 1e-6 if precision == "fp32" else BF16_REL
                assert rel(got, ref) <= tol, f"{family} {precision} ZeRO-{stage}, {n} process(es): {got} vs {ref}"


def test_two_processes_equal_one_process(matrix):
    for family in FAMILIES:
        for precision in ("fp32", "bf16"):
            for stage in STAGES:
                one, two = matrix[1][family][precision][stage], matrix[2][family][precision][stage]
                assert one["weights"] == two["weights"]
                for a, b in zip(two["losses"], one["losses"]):
                    assert rel(a, b) <= LATER_REL[precision], f"{family} {precision} ZeRO-{stage}: {a} vs {b}"


# ---------------------------------------------------------------------------------------------
# model.init under ZeRO-3, and a rotary model trained in bf16 under ZeRO-3 at 1024 tokens
# ---------------------------------------------------------------------------------------------

LLAMA_1024 = ["model.preset=llama-tiny", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.d_model=64",
              # a large init makes attention sharp, so a wrong rotation angle shows in the logits
              "model.init_std=0.25", "model.max_seq_len=1024", "data.seq_len=1024", "train.micro_batch=1",
              "train.grad_accum=1", "train.max_steps=3", "precision=bf16", "zero.stage=3"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tokenizer_dir):
    """Checkpoints and Hugging Face exports of a tied (gpt2-style) and an untied rotary model
    (llama-style, trained in bf16 under ZeRO-3 by two processes at 1024 tokens), and the
    logits a two-process ZeRO-3 training engine computes after starting from each."""
    tmp = tmp_path_factory.mktemp("init")
    _, gpt2 = pretrain(tmp, tokenizer_dir, "gpt2", "train.max_steps=3")
    _, llama = pretrain(tmp, tokenizer_dir, "llama", *LLAMA_1024, nprocs=2, launcher="deepspeed")
    src = {}
    for name, run_dir in (("gpt2", gpt2), ("llama", llama)):
        src[name] = run_dir / "checkpoints/latest"
        src[f"{name}_hf"] = tmp / f"{name}_hf"
        run_cmd([str(BIN / "llmstack"), "export", str(src[name]), "--out", str(src[f"{name}_hf"])], cwd=tmp)
    ids = torch.randint(4, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    ids_1024 = torch.randint(4, 1024, (1, 1024), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp / "ids.pt")
    torch.save(ids_1024, tmp / "ids_1024.pt")
    runs = [arg for name in ("gpt2", "gpt2_hf", "llama", "llama_hf")
            for arg in ("--run", str(src[name]), "fp32", str(tmp / f"{name}.pt"))]
    launch("tests/distributed/init_logits.py", ["--ids", str(tmp / "ids.pt"), "--stage", "3", *runs], 2, tmp)
    launch("tests/distributed/init_logits.py", ["--ids", str(tmp / "ids_1024.pt"), "--stage", "3",
                                         "--run", str(src["llama"]), "bf16", str(tmp / "llama_bf16.pt")], 2, tmp)
    logits = {p.stem: torch.load(p) for p in tmp.glob("*.pt") if not p.stem.startswith("ids")}
    return src, ids, ids_1024, logits


@pytest.mark.parametrize("name", ["gpt2", "gpt2_hf", "llama", "llama_hf"])
def test_model_init_under_zero3_gives_the_source_models_logits(sources, name):
    from llmstack.train.weights import load_for_inference

    src, ids, _, logits = sources
    model, _, _ = load_for_inference(src[name])
    assert model.config.tie_embeddings == name.startswith("gpt2")  # tied and untied both covered
    with torch.no_grad():
        ref = model(ids).float()
    torch.testing.assert_close(logits[name], ref, rtol=1e-5, atol=1e-5)


def test_bf16_rotary_model_trained_under_zero3_matches_transformers_at_every_position(sources):
    """Our ZeRO-3 bf16 engine vs transformers' LlamaForCausalLM in bf16, on 1024 tokens. The bound
    is transformers' own bf16 error (its bf16 logits against its fp32 logits): ours may not be
    further from transformers' bf16 than that, at any position, past 256 (where bf16 can no longer
    represent every position) included."""
    from transformers import AutoModelForCausalLM

    src, _, ids, logits = sources
    hf = {dt: AutoModelForCausalLM.from_pretrained(src["llama_hf"], dtype=dt).eval()
          for dt in (torch.float32, torch.bfloat16)}
    with torch.no_grad():
        ref32, ref16 = (hf[dt](ids).logits.float()[0] for dt in (torch.float32, torch.bfloat16))
    ours = logits["llama_bf16"][0]
    bound = (ref16 - ref32).abs().max().item()
    err = (ours - ref16).abs().max(-1).values  # (T,)
    assert err.max().item() <= bound, (err.max().item(), bound)
    assert err[256:].max().item() <= bound
    assert (ours - ref32).abs().max().item() <= 1.5 * bound


def test_bf16_gradients_accumulate_and_reduce_in_fp32_under_zero(matrix):
    for res in matrix.values():
        for family in FAMILIES:
            for stage in STAGES:
                got = res[family]["bf16"][stage]
                assert got["comm_dtype"] == "torch.float32", (family, stage)
                # without ZeRO DeepSpeed 0.19 refuses fp32 accumulation of a bf16 model (README)
                want = "torch.bfloat16" if stage == "0" else "torch.float32"
                assert got["grad_accum_dtype"] == want, (family, stage)


def test_bf16_zero1_checkpoint_consolidates_to_its_fp32_masters(tmp_path, tokenizer_dir):
    """bf16 at ZeRO-1 runs DeepSpeed's bf16 optimizer (fp32 gradient accumulation), whose
    `bf16_zero_pp_rank_*` files DeepSpeed's zero_to_fp32 cannot read: consolidation (export,
    generate, model.init) rebuilds the fp32 master weights from the ranks' partitions."""
    from llmstack.distributed.deepspeed import consolidated_state_dict, safe_load

    _, run_dir = pretrain(tmp_path, tokenizer_dir, "z1", "train.max_steps=2", "train.micro_batch=2", "precision=bf16",
                          "zero.stage=1", nprocs=2, launcher="deepspeed")
    step = run_dir / "checkpoints/step_2"
    assert len(list(step.glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    sd = consolidated_state_dict(step)
    module = safe_load(step / "mp_rank_00_model_states.pt", deepspeed_state=True)["module"]
    assert sd.keys() == module.keys()
    for name, t in module.items():
        assert sd[name].dtype == torch.float32
        assert torch.equal(sd[name].to(torch.bfloat16), t), name  # the bf16 weights are the masters, rounded
    assert any(not torch.equal(sd[n], module[n].float()) for n in module)  # ... which carry more bits
    assert torch.equal(sd["lm_head.weight"], sd["wte.weight"])  # tied
    run_cmd([str(BIN / "llmstack"), "export", str(step), "--out", str(tmp_path / "hf")], cwd=tmp_path)
