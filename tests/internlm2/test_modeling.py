"""Forward-pass behaviour of the native InternLM2: layout, cache, masks, backends, rope."""

import math

import pytest
import torch
import torch.nn.functional as F

from blip2_internlm.internlm2 import InternLM2Config
from blip2_internlm.internlm2.modeling import InternLM2Attention, InternLM2RMSNorm, InternLM2RotaryEmbedding

# eager vs SDPA, cached vs full, fused vs per-head products: fp32 sums of at most 32 O(1) terms in other
# groupings, ~1e-7 apart, against ATOL 1e-5; the torch.equal checks run the same ops on both sides
pytestmark = pytest.mark.kernel_sensitive

ATOL = 1e-5


def test_wqkv_rows_are_grouped_per_kv_head_by_hand():
    """4 query heads, 2 kv heads, head_dim 2: wqkv rows are [q0 q1 k0 v0 | q2 q3 k1 v1]."""
    config = InternLM2Config(
        hidden_size=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=8, vocab_size=8, bias=False
    )
    attn = InternLM2Attention(config, layer_idx=0)
    torch.manual_seed(0)
    q = [torch.randn(2, 8) for _ in range(4)]  # per query head: head_dim x hidden
    k = [torch.randn(2, 8) for _ in range(2)]
    v = [torch.randn(2, 8) for _ in range(2)]
    wqkv = torch.cat([q[0], q[1], k[0], v[0], q[2], q[3], k[1], v[1]])
    assert wqkv.shape == attn.wqkv.weight.shape
    with torch.no_grad():
        attn.wqkv.weight.copy_(wqkv)

    x = torch.randn(1, 3, 8)
    query, key, value = attn.split_qkv(attn.wqkv(x))
    assert query.shape == (1, 4, 3, 2) and key.shape == value.shape == (1, 2, 3, 2)
    for h in range(4):
        torch.testing.assert_close(query[0, h], x[0] @ q[h].T)
    for g in range(2):
        torch.testing.assert_close(key[0, g], x[0] @ k[g].T)
        torch.testing.assert_close(value[0, g], x[0] @ v[g].T)

    # Full attention against a by-hand reference: query head h reads kv head h // 2.
    with torch.no_grad():
        attn.wo.weight.copy_(torch.eye(8))
    cos, sin = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)  # rotary off
    mask = torch.full((3, 3), float("-inf")).triu(1)[None, None]
    config._attn_implementation = "eager"
    out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask)
    heads = []
    for h in range(4):
        qh, kh, vh = x[0] @ q[h].T, x[0] @ k[h // 2].T, x[0] @ v[h // 2].T
        scores = qh @ kh.T / math.sqrt(2) + mask[0, 0]
        heads.append(scores.softmax(-1) @ vh)
    torch.testing.assert_close(out[0], torch.cat(heads, dim=-1))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_cached_incremental_decoding_equals_full_forward(make_model, impl):
    model = make_model(attn_implementation=impl)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        # a 3-token chunk, then one token at a time
        out = model(ids[:, 5:8], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        for t in range(8, 12):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)
    assert cache.get_seq_length() == 12
    assert cache.layers[0].keys.shape == (2, 2, 12, 8)  # GQA: 2 kv heads are cached, not 4


def _left_padded(generator_seed=3):
    g = torch.Generator().manual_seed(generator_seed)
    ids = torch.randint(3, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, 2)  # pad = </s>
    return ids, mask


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "gen_kwargs", [dict(do_sample=False), dict(do_sample=False, num_beams=3)], ids=["greedy", "beam"]
)
def test_generate_from_inputs_embeds_equals_generate_from_ids(make_model, impl, gen_kwargs):
    model = make_model(attn_implementation=impl)
    ids, mask = _left_padded()
    common = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=2, eos_token_id=None, **gen_kwargs)
    with torch.no_grad():
        from_ids = model.generate(input_ids=ids, **common)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model.generate(inputs_embeds=embeds, **common)
    assert torch.equal(from_ids[:, ids.shape[1] :], from_embeds)


def test_sampling_from_inputs_embeds_equals_sampling_from_ids(make_model):
    model = make_model()
    ids, mask = _left_padded()
    common = dict(
        attention_mask=mask,
        max_new_tokens=6,
        pad_token_id=2,
        eos_token_id=None,
        do_sample=True,
        top_k=20,
        temperature=0.9,
    )
    with torch.no_grad():
        torch.manual_seed(7)
        from_ids = model.generate(input_ids=ids, **common)
        torch.manual_seed(7)
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **common)
    assert torch.equal(from_ids[:, ids.shape[1] :], from_embeds)


def test_left_padding_does_not_change_a_rows_generation(make_model):
    model = make_model()
    ids, mask = _left_padded()
    with torch.no_grad():
        batch = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None
        )
        alone = model.generate(
            input_ids=ids[:1, 4:], max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None
        )
    assert torch.equal(batch[0, ids.shape[1] :], alone[0, 5:])


def test_generate_uses_the_kv_cache(make_model):
    model = make_model()
    ids, mask = _left_padded()
    lengths = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(
            (kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None else kwargs["input_ids"]).shape[1]
        ),
        with_kwargs=True,
    )
    try:
        with torch.no_grad():
            model.generate(
                inputs_embeds=model.get_input_embeddings()(ids),
                attention_mask=mask,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=2,
                eos_token_id=None,
            )
    finally:
        hook.remove()
    assert lengths == [9, 1, 1, 1]


def test_eager_and_sdpa_agree_with_padding_mask(make_model):
    eager, sdpa = make_model(attn_implementation="eager"), make_model(attn_implementation="sdpa")
    ids, mask = _left_padded()
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = sdpa(ids, attention_mask=mask).logits
    assert not torch.isnan(b).any()
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(make_model):
    ids, mask = _left_padded()
    labels = ids.masked_fill(mask == 0, -100)

    def grads(checkpointing):
        model = make_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        mlp = model.model.layers[0].feed_forward
        forward = mlp.forward
        mlp.forward = lambda x: (calls.append(1), forward(x))[1]  # hooks do not fire on recompute
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)

    loss_a, g_a, calls_a = grads(False)
    loss_b, g_b, calls_b = grads(True)
    assert calls_a == 1 and calls_b == 2  # the checkpointed layer really ran again in backward
    torch.testing.assert_close(loss_a, loss_b)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rmsnorm_normalises_in_fp32_then_casts_back():
    norm = InternLM2RMSNorm(16, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(2, 3, 16) * 50).to(torch.bfloat16)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def _rope_tables(config, positions):
    rope = InternLM2RotaryEmbedding(config)
    return rope(torch.zeros(1, dtype=torch.float32), torch.tensor([positions]))


def test_linear_rope_scaling_divides_positions():
    base = InternLM2Config(hidden_size=32, num_attention_heads=2, max_position_embeddings=16)
    scaled = InternLM2Config(
        hidden_size=32,
        num_attention_heads=2,
        max_position_embeddings=16,
        rope_scaling={"type": "linear", "factor": 4.0},
    )
    cos_s, sin_s = _rope_tables(scaled, [0, 4, 8, 40])
    cos_b, sin_b = _rope_tables(base, [0, 1, 2, 10])
    torch.testing.assert_close(cos_s, cos_b)
    torch.testing.assert_close(sin_s, sin_b)


def test_dynamic_ntk_rope_follows_the_official_formula():
    kw = dict(hidden_size=32, num_attention_heads=2, max_position_embeddings=16, rope_theta=10000.0)
    plain = InternLM2Config(**kw)
    dynamic = InternLM2Config(**kw, rope_scaling={"type": "dynamic", "factor": 2.0})
    # within max_position_embeddings nothing changes
    short = list(range(16))
    for a, b in zip(_rope_tables(dynamic, short), _rope_tables(plain, short)):
        assert torch.equal(a, b)
    # beyond it the base grows: base * ((factor * L / max_pos) - (factor - 1)) ** (d / (d - 2))
    long = list(range(24))
    dim, L = 16, 24
    new_base = 10000.0 * ((2.0 * L / 16) - 1.0) ** (dim / (dim - 2))
    inv_freq = 1.0 / new_base ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.tensor(long, dtype=torch.float32)[:, None] * inv_freq
    cos, sin = _rope_tables(dynamic, long)
    torch.testing.assert_close(cos[0], torch.cat([freqs, freqs], -1).cos())
    torch.testing.assert_close(sin[0], torch.cat([freqs, freqs], -1).sin())


def test_dynamic_rope_does_not_leak_state_between_calls(make_model):
    model = make_model(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8)
    ids = torch.randint(3, 97, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids[:, :6]).logits
        long = model(ids).logits
        after = model(ids[:, :6]).logits
        plain = make_model(max_position_embeddings=8)(ids).logits
    assert torch.equal(before, after)
    assert not torch.allclose(long, plain, atol=1e-3)  # scaling really kicked in past 8 positions


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}])
def test_rope_scaled_gqa_model_decodes_incrementally(make_model, scaling):
    model = make_model(rope_scaling=scaling, num_attention_heads=8, num_key_value_heads=2)
    ids = torch.randint(3, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        parts = [out.logits]
        for t in range(6, 10):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            parts.append(out.logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=ATOL, rtol=0)


def test_loss_and_embeddings_api(make_model):
    model = make_model()
    ids = torch.randint(3, 97, (2, 7))
    out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, :-1].reshape(-1, 97)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, ids[:, 1:].reshape(-1)))
    assert model.get_input_embeddings() is model.model.tok_embeddings
    assert model.get_output_embeddings() is model.output
    # training on inputs_embeds (the BLIP-2 path) matches training on ids
    out_e = model(inputs_embeds=model.get_input_embeddings()(ids), labels=ids)
    torch.testing.assert_close(out_e.loss, out.loss)
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=ids, inputs_embeds=model.get_input_embeddings()(ids))
