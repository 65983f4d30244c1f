"""Model component options, each checked against a direct computation of its defining formula.

Positional encodings, attention patterns (the exact set of positions each query sees), GQA/MQA,
norms (pre/post, final, LayerScale), activations and gated MLPs, initialisations, and the loss
options (label smoothing, z-loss). Small tensors, fp32 / fp64 references.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmstack.models import layers
from llmstack.models.gpt import GPT, gpt_config_from_preset

V = 64


def tiny(seed: int = 0, **kw) -> GPT:
    base = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=32)
    cfg = gpt_config_from_preset("gpt2-tiny", V, **{**base, **kw})
    torch.manual_seed(seed)
    m = GPT(cfg)
    m.init_weights()
    return m.eval()


def embedding_output(m: GPT, ids: torch.Tensor, **kw) -> torch.Tensor:
    """What the first block receives (the embeddings with absolute positions added)."""
    seen = {}
    h = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        m(ids, **kw)
    h.remove()
    return seen["x"]


# ---------------------------------------------------------------------------------------------
# positional encodings
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_table_is_the_formula():
    T, d = 11, 10
    pe = layers.sinusoidal_table(T, d)
    for t in range(T):
        for i in range(d // 2):
            assert pe[t, 2 * i].item() == pytest.approx(math.sin(t / 10000 ** (2 * i / d)), abs=1e-6)
            assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(t / 10000 ** (2 * i / d)), abs=1e-6)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rotary", "alibi", "none"])
def test_absolute_positions_are_added_to_embeddings_only_when_absolute(pos):
    m = tiny(pos=pos)
    ids = torch.randint(0, V, (2, 9))
    x = embedding_output(m, ids)
    expected = m.wte.weight[ids]
    if pos == "learned":
        expected = expected + m.wpe.weight[:9]
    if pos == "sinusoidal":
        expected = expected + layers.sinusoidal_table(32, 32)[:9]
        assert "pe" not in m.state_dict()  # fixed: not a parameter, not saved
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
    # explicit per-row positions index the same table
    pos_ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11]] * 2)
    if pos in ("learned", "sinusoidal"):
        table = m.wpe.weight if pos == "learned" else layers.sinusoidal_table(32, 32)
        torch.testing.assert_close(embedding_output(m, ids, position_ids=pos_ids), m.wte.weight[ids] + table[3:12],
                                   rtol=0, atol=1e-6)


def test_rotary_rotates_pairs_by_position_angle():
    hd, T, theta = 8, 6, 10000.0
    x = torch.randn(1, 1, T, hd, dtype=torch.float64)
    cos, sin = layers.rotary_tables(hd, T, theta)
    out = layers.apply_rotary(x, cos.double(), sin.double())
    half = hd // 2
    for t in range(T):
        for i in range(half):
            a = t * theta ** (-2 * i / hd)  # pair (x[i], x[i + hd/2]) rotated by angle a
            x1, x2 = x[0, 0, t, i].item(), x[0, 0, t, i + half].item()
            assert out[0, 0, t, i].item() == pytest.approx(x1 * math.cos(a) - x2 * math.sin(a), abs=1e-5)
            assert out[0, 0, t, i + half].item() == pytest.approx(x2 * math.cos(a) + x1 * math.sin(a), abs=1e-5)


def test_alibi_slopes_and_bias_are_the_formula():
    assert layers.alibi_slopes(8).tolist() == pytest.approx([2 ** -k for k in range(1, 9)])
    assert layers.alibi_slopes(4).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])
    # not a power of two (Press et al.): the 4 slopes of n=4, then the odd ones of n=8
    assert layers.alibi_slopes(6).tolist() == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])
    slopes = layers.alibi_slopes(4)
    bias = layers.alibi_bias(slopes, torch.arange(3, 6), torch.arange(6))
    for h in range(4):
        for i, qi in enumerate(range(3, 6)):
            for j in range(6):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h].item() * (qi - j))


def test_alibi_attention_equals_direct_softmax_with_linear_bias():
    m = tiny(pos="alibi")
    attn = m.blocks[0].attn
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        got = attn(x, mask=m._pattern_mask(None, 0, 7, x.dtype))
        q, k, v = attn.qkv(x).view(2, 7, 12, 8).transpose(1, 2).split([4, 4, 4], dim=1)
        slopes = layers.alibi_slopes(4)
        i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
        scores = q @ k.transpose(-1, -2) / math.sqrt(8) - slopes[:, None, None] * (i - j)
        scores = scores.masked_fill(j > i, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
        torch.testing.assert_close(got, attn.proj(y), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# attention patterns
# ---------------------------------------------------------------------------------------------


def visible(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def test_pattern_masks_are_the_exact_visible_sets():
    T = 12
    q = k = torch.arange(T)
    full = visible(layers.pattern_mask("full", q, k))
    assert full == [set(range(i + 1)) for i in range(T)]
    w = 3  # each token sees the previous w positions, itself included
    sliding = [set(range(max(0, i - w + 1), i + 1)) for i in range(T)]
    assert visible(layers.pattern_mask("sliding", q, k, window=w)) == sliding
    assert visible(layers.pattern_mask("sliding", q, k, window=3))[5] == {3, 4, 5}
    # Child et al. 2019, strided: A1 = {max(0, i-l) .. i}, A2 = {j : (i - j) mod l = 0}
    l = 4
    strided = [set(range(max(0, i - l), i + 1)) | {j for j in range(i + 1) if (i - j) % l == 0} for i in range(T)]
    assert visible(layers.pattern_mask("strided", q, k, block=l)) == strided
    assert strided[11] == {3, 7, 8, 9, 10, 11}
    # fixed: A1 = own block {j : floor(j/l) = floor(i/l)}, A2 = summary columns {j : j mod l in [l-c, l)}
    c = 1
    fixed = [{j for j in range(i + 1) if j // l == i // l or j % l >= l - c} for i in range(T)]
    assert visible(layers.pattern_mask("fixed", q, k, block=l, summary=c)) == fixed
    assert fixed[9] == {3, 7, 8, 9}
    # with a KV cache, queries sit after the cached positions
    cached = layers.pattern_mask("sliding", torch.arange(8, 10), torch.arange(10), window=3)
    assert visible(cached) == [{6, 7, 8}, {7, 8, 9}]


def keys_per_token(pattern: str, T: int, **kw) -> float:
    return layers.pattern_mask(pattern, torch.arange(T), torch.arange(T), **kw).sum().item() / T


@pytest.mark.parametrize("pattern,covering,narrow", [
    ("sliding", dict(attn_window=16), dict(attn_window=4)),
    ("strided", dict(attn_block=16), dict(attn_block=4)),
    ("fixed", dict(attn_block=16, attn_summary=2), dict(attn_block=4, attn_summary=1)),
])
def test_sparse_patterns_equal_full_attention_only_when_covering_the_context(pattern, covering, narrow):
    T = 16
    ids = torch.randint(0, V, (2, T))
    with torch.no_grad():
        ref = tiny()(ids)
        same = tiny(attn_pattern=pattern, **covering)(ids)
        other = tiny(attn_pattern=pattern, **narrow)(ids)
    torch.testing.assert_close(same, ref, rtol=0, atol=1e-5)
    assert (other - ref).abs().max() > 1e-3
    # the first positions see everything in every pattern: identical there
    torch.testing.assert_close(other[:, :2], ref[:, :2], rtol=0, atol=1e-5)
    full_cost = keys_per_token("full", T)
    cost = keys_per_token(pattern, T, window=narrow.get("attn_window", 0), block=narrow.get("attn_block", 0),
                          summary=narrow.get("attn_summary", 1))
    print(f"{pattern}: {cost:.2f} keys per token vs {full_cost:.2f} full (T={T})")
    assert cost < full_cost


@pytest.mark.parametrize("kw", [dict(pos="alibi"), dict(pos="sinusoidal", attn_pattern="sliding", attn_window=5),
                                dict(pos="rotary", attn_pattern="fixed", attn_block=4, attn_summary=1, n_kv_head=1),
                                dict(pos="alibi", attn_pattern="strided", attn_block=3)])
def test_kv_cache_decoding_matches_full_forward(kw):
    m = tiny(**kw)
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 12)
        parts = [m(ids[:, :5], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_grouped_and_multi_query_attention_share_kv_heads(n_kv):
    B, nh, T, hd = 2, 4, 5, 8
    q = torch.randn(B, nh, T, hd, dtype=torch.float64)
    k, v = torch.randn(B, n_kv, T, hd, dtype=torch.float64), torch.randn(B, n_kv, T, hd, dtype=torch.float64)
    got = layers.attention(q, k, v, causal=True)
    for h in range(nh):
        kv = h // (nh // n_kv)  # query head h reads key/value head h // group
        s = q[:, h] @ k[:, kv].transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        torch.testing.assert_close(got[:, h], s.softmax(-1) @ v[:, kv])
    m = tiny(n_kv_head=n_kv)
    assert m.blocks[0].attn.qkv.out_features == (4 + 2 * n_kv) * 8


def test_attention_dropout_only_in_training():
    m = tiny(attn_dropout=0.5)
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        a, b = m(ids), m(ids)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, tiny(attn_dropout=0.0)(ids), rtol=0, atol=1e-6)
        m.train()
        assert (m(ids) - a).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# norms, residuals
# ---------------------------------------------------------------------------------------------


def test_layernorm_and_rmsnorm_are_the_formulas():
    x = torch.randn(3, 16, dtype=torch.float64)
    ln = layers.make_norm("layernorm", 16, 1e-5, True).double()
    rms = layers.make_norm("rmsnorm", 16, 1e-6, False).double()
    with torch.no_grad():
        for n in (ln, rms):
            n.weight.copy_(torch.randn(16))
        ln.bias.copy_(torch.randn(16))
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        torch.testing.assert_close(ln(x), (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias)
        # (RMSNorm computes in fp32 by design, whatever the input dtype)
        torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_block_residual_layout(norm_position, layer_scale):
    m = tiny(norm_position=norm_position, layer_scale=layer_scale)
    blk = m.blocks[0]
    with torch.no_grad():
        if layer_scale:
            assert torch.equal(blk.ls_1.gamma, torch.full((32,), 0.1))
            blk.ls_1.gamma.copy_(torch.randn(32))
            blk.ls_2.gamma.copy_(torch.randn(32))
        g1 = blk.ls_1.gamma if layer_scale else 1.0
        g2 = blk.ls_2.gamma if layer_scale else 1.0
        x = torch.randn(2, 6, 32)
        if norm_position == "pre":
            h = x + g1 * blk.attn(blk.ln_1(x))
            want = h + g2 * blk.mlp(blk.ln_2(h))
        else:
            h = blk.ln_1(x + g1 * blk.attn(x))
            want = blk.ln_2(h + g2 * blk.mlp(h))
        torch.testing.assert_close(blk(x), want, rtol=0, atol=1e-6)


def test_final_norm_option():
    ids = torch.randint(0, V, (1, 6))
    for final in (True, False):
        m = tiny(final_norm=final)
        seen = {}
        m.blocks[-1].register_forward_hook(lambda mod, a, out: seen.setdefault("x", out))
        with torch.no_grad():
            h = m.hidden_states(ids)
        torch.testing.assert_close(h, m.ln_f(seen["x"]) if final else seen["x"], rtol=0, atol=0)
        assert ("ln_f.weight" in m.state_dict()) == final


# ---------------------------------------------------------------------------------------------
# activations, MLPs
# ---------------------------------------------------------------------------------------------

FORMULAS = {
    "relu": lambda x: torch.clamp(x, min=0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_activation_is_the_formula(name):
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    torch.testing.assert_close(layers.ACTIVATIONS[name](x), FORMULAS[name](x))


@pytest.mark.parametrize("mlp,act", [("swiglu", "silu"), ("geglu", "gelu"), ("reglu", "relu")])
def test_gated_mlps_are_the_formula_at_matched_parameter_count(mlp, act):
    m = tiny(mlp=mlp, d_model=96, n_head=4)
    f = m.blocks[0].mlp
    assert isinstance(f, layers.GatedMLP) and m.config.act == act
    x = torch.randn(3, 96)
    with torch.no_grad():
        wg, wu = f.fc.weight.split(f.hidden)  # rows [gate | up]
        bg, bu = f.fc.bias.split(f.hidden)
        want = (FORMULAS[act](x @ wg.T + bg) * (x @ wu.T + bu)) @ f.proj.weight.T + f.proj.bias
        torch.testing.assert_close(f(x), want, rtol=0, atol=1e-5)
    plain = tiny(d_model=96, n_head=4).blocks[0].mlp
    n_gated = f.fc.weight.numel() + f.proj.weight.numel()
    n_plain = plain.fc.weight.numel() + plain.proj.weight.numel()
    # hidden = 2/3 * 4d rounded up to a multiple of 64: equal counts up to that rounding
    assert f.hidden == 256 and abs(n_gated - n_plain) <= 3 * 96 * 64 and n_gated == n_plain


def test_plain_mlp_takes_any_activation():
    m = tiny(activation="mish")
    f = m.blocks[0].mlp
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(f(x), f.proj(FORMULAS["mish"](f.fc(x))), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# initialisation (statistics of large draws against the formula's variance)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme,std", [("normal", lambda fi, fo, L: 0.02 / math.sqrt(2 * L)),
                                        ("xavier", lambda fi, fo, L: math.sqrt(2 / (fi + fo))),
                                        ("kaiming", lambda fi, fo, L: math.sqrt(2 / fi))])
def test_init_schemes_have_the_formula_variance(scheme, std):
    m = tiny(d_model=128, n_head=4, n_layer=3, init_scheme=scheme)
    for name, w, resid in (("qkv", m.blocks[0].attn.qkv.weight, False), ("proj", m.blocks[0].mlp.proj.weight, True),
                           ("fc", m.blocks[1].mlp.fc.weight, False)):
        fo, fi = w.shape
        want = std(fi, fo, 3) if (scheme != "normal" or resid) else 0.02
        assert w.std().item() == pytest.approx(want, rel=0.03), name
        assert abs(w.mean().item()) < 0.05 * want
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.equal(m.blocks[0].attn.qkv.bias, torch.zeros_like(m.blocks[0].attn.qkv.bias))


def test_small_init_embeddings():
    m = tiny(d_model=128, n_head=4, embed_init="small")
    w = m.wte.weight
    assert w.abs().max().item() <= 1e-4
    assert w.var().item() == pytest.approx((2e-4) ** 2 / 12, rel=0.05)  # uniform(-a, a): a^2 / 3
    assert m.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)  # positions keep normal(init_std)


# ---------------------------------------------------------------------------------------------
# loss options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_label_smoothing_and_z_loss_match_the_formula(smoothing, z):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :2] = -100
    loss = layers.linear_cross_entropy(x, w, labels, label_smoothing=smoothing, z_loss=z)
    gx, gw = torch.autograd.grad(loss, (x, w))
    x2, w2 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()  # fp64 reference
    logits = x2 @ w2.T
    keep = labels != -100
    ref = F.cross_entropy(logits[keep], labels[keep], label_smoothing=smoothing)
    ref = ref + z * torch.logsumexp(logits[keep], -1).square().mean()
    rx, rw = torch.autograd.grad(ref, (x2, w2))
    for a, b in ((loss, ref), (gx, rx), (gw, rw)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)
