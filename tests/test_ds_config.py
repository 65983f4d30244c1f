"""The DeepSpeed layer's single-process pieces: the generated ds_config at each precision, bucket
sizes, loading a state dict into tied and untied models, and host-side initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from llmstack import models
from llmstack.distributed import deepspeed as ds
from llmstack.errors import UsageError


def config(precision: str, stage: int, **kw) -> dict:
    return ds.build_ds_config(micro_batch=2, grad_accum=4, world=2, precision=precision, zero_stage=stage,
                              offload_optimizer=False, offload_params=False, grad_clip=1.0, lr=1e-3,
                              betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kw)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_under_zero_accumulates_and_reduces_in_fp32(stage):
    cfg = config("bf16", stage)
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["communication_data_type"] == "fp32"
    assert config("bf16", stage, comm_dtype="bf16")["communication_data_type"] == "bf16"


def test_fp32_and_stage0_keep_deepspeeds_accumulation_dtype():
    # DeepSpeed refuses fp32 accumulation of a bf16 model without ZeRO ("unsupported mix"), and
    # an fp32 model accumulates in fp32 anyway
    assert "data_types" not in config("bf16", 0)
    assert "data_types" not in config("fp32", 2)


def test_buckets_let_communication_overlap_backward():
    # a 124M model reduces in several buckets (the first ones while backward goes on) ...
    assert ds.bucket_elements(124_000_000) <= 124_000_000 // 2
    assert 5e7 <= ds.bucket_elements(10**10) <= 2e8
    # ... a tiny one in one bucket no larger than itself, a multiple of 64
    assert ds.bucket_elements(1001) == 1024


def tiny(preset: str):
    arch = models.build_config("gpt", preset, 128, n_layer=1, n_head=2, d_model=32, max_seq_len=16)
    torch.manual_seed(0)
    m = models.build_model("gpt", arch)
    m.init_weights()
    return m


# (preset, does the state dict carry lm_head.weight): a tied model's checkpoint may store the shared
# tensor under both names (our state_dict, transformers' GPT-2) or once; an untied one has both
@pytest.mark.parametrize("preset,with_head", [("gpt2-tiny", True), ("gpt2-tiny", False), ("llama-tiny", True)])
def test_load_state_dict_into_tied_and_untied_models(preset, with_head):
    src, dst = tiny(preset), tiny(preset)
    assert src.config.tie_embeddings == (preset == "gpt2-tiny")
    for p in dst.parameters():
        nn.init.zeros_(p)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    if not with_head:
        del state["lm_head.weight"]
    ds.load_state_dict_into(dst, state, zero_stage=0)
    for (n, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), n


def test_load_state_dict_refuses_misfits():
    m = tiny("gpt2-tiny")
    state = m.state_dict()
    with pytest.raises(UsageError, match="unexpected \\['extra'\\]"):
        ds.load_state_dict_into(m, {**state, "extra": torch.zeros(1)}, zero_stage=0)
    with pytest.raises(UsageError, match="missing \\['ln_f.weight'\\]"):
        ds.load_state_dict_into(m, {k: v for k, v in state.items() if k != "ln_f.weight"}, zero_stage=0)
    other = {**state, "lm_head.weight": state["wte.weight"] + 1}  # untied values into a tied model
    with pytest.raises(UsageError, match="ties them"):
        ds.load_state_dict_into(m, other, zero_stage=0)
    short = {**state, "ln_f.weight": state["ln_f.weight"][:-1]}  # a tensor of another shape: named, no traceback
    with pytest.raises(UsageError, match=r"ln_f.weight has shape \(\d+,\), the model's \(\d+,\)"):
        ds.load_state_dict_into(m, short, zero_stage=0)


def test_init_on_host_draws_fp32_values_whatever_the_parameters_dtype():
    """ZeRO-3 parameters live on the GPU in the training dtype; initialising them there would draw
    from the device generator (and in bf16), so ZeRO-3 would start from other weights than ZeRO-0,
    whose model is initialised on the host in fp32 before the engine moves and casts it."""
    lin = nn.Linear(8, 16).to(torch.bfloat16)
    seen = []

    def init(m):
        seen.append((m.weight.dtype, m.weight.device.type))
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)

    torch.manual_seed(0)
    ds._init_on_host(lin, list(lin.parameters(recurse=False)), init)
    ref = nn.Linear(8, 16)
    torch.manual_seed(0)
    init(ref)
    assert seen[0] == (torch.float32, "cpu")
    assert lin.weight.dtype == torch.bfloat16 and torch.equal(lin.weight, ref.weight.to(torch.bfloat16))


def test_init_on_host_keeps_a_parameter_the_module_leaves_alone():
    m = tiny("gpt2-tiny")  # lm_head shares wte's weight and does not initialise it
    before = m.lm_head.weight.detach().clone()
    ds._init_on_host(m.lm_head, list(m.lm_head.parameters(recurse=False)), m.init_module_)
    assert torch.equal(m.lm_head.weight, before)
