"""Fused attention in LAVIS's EVA ViT and Q-Former: SDPA gives eager's outputs and gradients
(fp32, atol 1e-5 unless stated), falls back to eager wherever the attention probabilities are
needed, and the switch (module attribute, model config key, $BLIP2_INTERNLM_ATTN) really switches."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

# SDPA's kernels against eager's matmul and softmax: fp32 sums of at most a few dozen O(1) terms, ~1e-7
# apart on any CPU, so ATOL (1e-5) holds with a wide margin; the CPU's ISA picks both sides' kernels
pytestmark = pytest.mark.kernel_sensitive

ATOL = 1e-5


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch.nn.functional.scaled_dot_product_attention (ours and the LLM's)."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


@pytest.fixture(autouse=True)
def default_switch(monkeypatch):
    monkeypatch.delenv("BLIP2_INTERNLM_ATTN", raising=False)


def run_both(module, inputs, forward):
    """(outputs, gradients of inputs and parameters) under eager and under sdpa."""
    results = {}
    for name in ("eager", "sdpa"):
        module.attn_implementation = name
        module.zero_grad(set_to_none=True)
        leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = forward(*leaves)
        torch.manual_seed(0)
        out.backward(torch.randn_like(out))
        grads = [x.grad for x in leaves if x.requires_grad] + [p.grad for p in module.parameters() if p.requires_grad]
        results[name] = (out.detach(), grads)
    return results


def assert_same(results, atol=ATOL):
    (out_e, grads_e), (out_s, grads_s) = results["eager"], results["sdpa"]
    torch.testing.assert_close(out_s, out_e, atol=atol, rtol=0)
    assert len(grads_e) == len(grads_s) and all(g is not None for g in grads_e + grads_s)
    for g_s, g_e in zip(grads_s, grads_e):
        torch.testing.assert_close(g_s, g_e, atol=atol, rtol=0)


# --- EVA ViT ----------------------------------------------------------------------------------


def eva_attention(window_size=None):
    from lavis.models.eva_vit import Attention

    torch.manual_seed(0)
    # qk_scale: a scale other than head_dim ** -0.5, so SDPA's default scale would be wrong
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_scale=0.25, window_size=window_size).train()
    with torch.no_grad():  # LAVIS zero-initialises these; random values make the test see them
        attn.q_bias.normal_()
        attn.v_bias.normal_()
        if window_size:
            attn.relative_position_bias_table.normal_()
    return attn


@pytest.mark.parametrize("table", [False, True], ids=["no_window_table", "window_table"])
@pytest.mark.parametrize("shared_bias", [False, True], ids=["no_rel_pos_bias", "rel_pos_bias"])
def test_eva_attention_sdpa_equals_eager_with_and_without_relative_position_bias(
    lavis_ready, sdpa_calls, table, shared_bias
):
    attn = eva_attention((3, 3) if table else None)
    x = torch.randn(2, 10, 32)  # 3x3 patches + cls
    inputs = [x] + ([torch.randn(1, 4, 10, 10)] if shared_bias else [])
    results = run_both(attn, inputs, lambda x, *bias: attn(x, rel_pos_bias=bias[0] if bias else None))
    assert_same(results)
    assert len(sdpa_calls) == 1


# --- Q-Former ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(lavis_ready):
    """A tiny LAVIS Q-Former BertModel: the source of LAVIS's own extended masks."""
    from lavis.models.blip2_models.Qformer import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
        encoder_width=24,
        add_cross_attention=True,
        cross_attention_freq=1,
        query_length=3,
    )
    return BertModel(config, add_pooling_layer=False)


def self_attention(bert, cross=False):
    from lavis.models.blip2_models.Qformer import BertSelfAttention

    torch.manual_seed(0)
    return BertSelfAttention(bert.config, is_cross_attention=cross).train()  # dropout 0


def padding_mask():
    return torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


def test_qformer_self_attention_with_padding_mask(bert, sdpa_calls):
    attn = self_attention(bert)
    mask = bert.get_extended_attention_mask(padding_mask(), (2, 7), "cpu", is_decoder=False)
    assert mask.shape == (2, 1, 1, 7)
    results = run_both(attn, [torch.randn(2, 7, 32)], lambda h: attn(h, attention_mask=mask)[0])
    assert_same(results)
    assert len(sdpa_calls) == 1


def test_qformer_self_attention_with_stage1_causal_and_query_prefix_mask(bert, sdpa_calls):
    # stage 1's ITG loss: 3 queries (bidirectional among themselves) + 4 text tokens (causal,
    # seeing every query); LAVIS builds this with is_decoder=True, has_query=True
    attn = self_attention(bert)
    mask = bert.get_extended_attention_mask(padding_mask(), (2, 4), "cpu", is_decoder=True, has_query=True)
    assert mask.shape == (2, 1, 7, 7)
    assert (mask[0, 0, :3, 3:] < 0).all() and (mask[0, 0, 3:, :3] == 0).all()  # queries do not see text
    results = run_both(attn, [torch.randn(2, 7, 32)], lambda h: attn(h, attention_mask=mask)[0])
    assert_same(results)


def test_qformer_self_attention_with_cached_keys_and_values(bert):
    attn = self_attention(bert)
    past = (torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8))
    mask = bert.get_extended_attention_mask(torch.ones(2, 7), (2, 2), "cpu", is_decoder=True)
    hidden = torch.randn(2, 2, 32)
    outputs = {}
    for name in ("eager", "sdpa"):
        attn.attn_implementation = name
        outputs[name] = attn(hidden, attention_mask=mask, past_key_value=past)
    torch.testing.assert_close(outputs["sdpa"][0], outputs["eager"][0], atol=ATOL, rtol=0)
    for cached_s, cached_e in zip(outputs["sdpa"][-1], outputs["eager"][-1]):  # the grown cache
        assert cached_s.shape == (2, 4, 7, 8)
        torch.testing.assert_close(cached_s, cached_e)


def test_qformer_cross_attention_with_encoder_mask(bert, sdpa_calls):
    attn = self_attention(bert, cross=True)
    encoder_mask = bert.invert_attention_mask(torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]]))
    results = run_both(
        attn,
        [torch.randn(2, 3, 32), torch.randn(2, 6, 24)],
        lambda q, image: attn(q, encoder_hidden_states=image, encoder_attention_mask=encoder_mask)[0],
    )
    assert_same(results)
    assert len(sdpa_calls) == 1


def test_head_mask_and_output_attentions_fall_back_to_eager(bert, sdpa_calls):
    attn = self_attention(bert)
    attn.attn_implementation = "sdpa"
    hidden = torch.randn(2, 7, 32)
    head_mask = torch.tensor([1.0, 0.0, 1.0, 1.0]).view(1, 4, 1, 1)
    masked = attn(hidden, head_mask=head_mask)[0]
    assert torch.equal(masked.view(2, 7, 4, 8)[:, :, 1], torch.zeros(2, 7, 8))  # head 1 masked out

    context, probs, _ = attn(hidden, output_attentions=True)
    assert probs.shape == (2, 4, 7, 7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 7))
    assert sdpa_calls == []


def test_save_attention_falls_back_and_still_saves_map_and_gradient(bert, sdpa_calls):
    # Grad-CAM (LAVIS's compute_gradcam) reads the cross-attention map and its gradient
    attn = self_attention(bert, cross=True)
    attn.attn_implementation = "sdpa"
    attn.save_attention = True
    context = attn(torch.randn(2, 3, 32), encoder_hidden_states=torch.randn(2, 6, 24))[0]
    context.sum().backward()
    assert attn.get_attention_map().shape == (2, 4, 3, 6)
    assert attn.get_attn_gradients().shape == (2, 4, 3, 6)
    assert sdpa_calls == []


def test_relative_key_position_embeddings_fall_back_to_eager(bert, sdpa_calls):
    from lavis.models.blip2_models.Qformer import BertSelfAttention

    config = bert.config.__class__(**{**bert.config.to_dict(), "position_embedding_type": "relative_key"})
    attn = BertSelfAttention(config, is_cross_attention=False)
    attn.attn_implementation = "sdpa"
    attn(torch.randn(1, 5, 32))
    assert sdpa_calls == []


def test_an_unknown_implementation_is_an_error_naming_it(bert, monkeypatch):
    from blip2_internlm.models.attention import set_attn_implementation

    attn = self_attention(bert)
    with pytest.raises(ValueError, match="'flash'.*sdpa"):
        set_attn_implementation(attn, "flash")
    monkeypatch.setenv("BLIP2_INTERNLM_ATTN", "fused")
    with pytest.raises(ValueError, match=r"\$BLIP2_INTERNLM_ATTN = 'fused'"):
        attn(torch.randn(1, 5, 32))


# --- whole models -----------------------------------------------------------------------------


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def tiny_internlm_cfg(**overrides):
    from lavis.common.registry import registry

    cfg = OmegaConf.load(registry.get_model_class("blip2_internlm").default_config_path("tiny")).model
    cfg.update(overrides)
    return cfg


def test_blip2_internlm_config_key_switches_vit_qformer_and_llm_and_losses_agree(lavis_ready, sdpa_calls):
    from lavis.common.registry import registry

    from blip2_internlm.models.attention import attention_modules, set_attn_implementation

    torch.manual_seed(0)
    model = registry.get_model_class("blip2_internlm").from_config(tiny_internlm_cfg(attn_implementation="eager"))
    sdpa_calls.clear()  # building may first generate and pretrain the tiny LLM asset (with SDPA)
    model = no_dropout(model).train()
    assert {m.attn_implementation for m in attention_modules(model)} == {"eager"}
    assert model.llm_model.config._attn_implementation == "eager"
    samples = {
        "image": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
        "text_input": ["a red circle on the left", "右边有一个蓝色的正方形"],
    }

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(samples)["loss"]
        loss.backward()
        return loss.detach(), [p.grad for p in (model.query_tokens, model.llm_proj.weight)]

    eager_loss, eager_grads = loss_and_grads()
    assert sdpa_calls == []

    set_attn_implementation(model, "sdpa")
    sdpa_loss, sdpa_grads = loss_and_grads()
    # one call per ViT block, Q-Former self- and cross-attention, and LLM layer
    assert len(sdpa_calls) == len(attention_modules(model)) + model.llm_model.config.num_hidden_layers
    torch.testing.assert_close(sdpa_loss, eager_loss, atol=ATOL, rtol=0)
    for g_s, g_e in zip(sdpa_grads, eager_grads):
        torch.testing.assert_close(g_s, g_e, atol=ATOL, rtol=0)


def test_blip2_internlm_defaults_to_sdpa_and_rejects_an_unknown_implementation(lavis_ready):
    from lavis.common.registry import registry

    from blip2_internlm.models.attention import attention_modules

    cls = registry.get_model_class("blip2_internlm")
    model = cls.from_config(tiny_internlm_cfg())
    assert {m.attn_implementation for m in attention_modules(model)} == {"sdpa"}
    assert model.llm_model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="model.attn_implementation = 'flash'"):
        cls.from_config(tiny_internlm_cfg(attn_implementation="flash"))


def test_stage1_qformer_loss_equal_eager_vs_sdpa_switched_by_environment(
    fresh_tiny_stage1_model, sdpa_calls, monkeypatch
):
    model = no_dropout(fresh_tiny_stage1_model).train()
    torch.manual_seed(1)
    samples = {
        "image": torch.randn(4, 3, 64, 64),
        "text_input": ["a red circle", "a blue square", "左边有一个红色的圆形", "x"],
    }

    def losses():
        torch.manual_seed(2)  # ITM hard negatives are sampled
        out = model(samples)
        return torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_lm]).detach()

    monkeypatch.setenv("BLIP2_INTERNLM_ATTN", "eager")
    eager = losses()
    assert sdpa_calls == []
    monkeypatch.delenv("BLIP2_INTERNLM_ATTN")
    sdpa = losses()
    assert len(sdpa_calls) > 0
    torch.testing.assert_close(sdpa, eager, atol=ATOL, rtol=0)
