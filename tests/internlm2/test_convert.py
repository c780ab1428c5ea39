"""Conversion to/from transformers' Llama: an independent check of the wqkv layout and rope."""

import pytest
import torch
from transformers import LlamaForCausalLM

from blip2_internlm.internlm2 import InternLM2ForCausalLM
from blip2_internlm.internlm2.convert import main, merge_wqkv, split_wqkv

# Llama's split q/k/v against our fused wqkv: the same fp32 products grouped in other GEMMs, ~1e-6 apart
# at these logits against atol 1e-5; the converted weights themselves are compared bit for bit
pytestmark = pytest.mark.kernel_sensitive


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(bias=True, num_attention_heads=8, num_key_value_heads=2),
        dict(rope_scaling={"type": "linear", "factor": 2.0}),
        dict(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    ],
    ids=["gqa", "bias-gqa4", "linear-rope", "dynamic-rope-past-max"],
)
def test_llama_conversion_round_trip_gives_the_same_logits(make_model, tmp_path, overrides):
    model = make_model(**overrides)
    if model.config.bias:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.attention.wqkv.bias.normal_()
                layer.attention.wo.bias.normal_()
    src, llama_dir, back_dir = tmp_path / "src", tmp_path / "llama", tmp_path / "back"
    model.save_pretrained(src)

    assert main(["--to-llama", str(src), str(llama_dir)]) == 0
    assert main(["--from-llama", str(llama_dir), str(back_dir)]) == 0
    llama = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    back = InternLM2ForCausalLM.from_pretrained(back_dir).eval()

    ids = torch.randint(3, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = llama(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-5, rtol=0)

    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    assert back.config.rope_scaling == model.config.rope_scaling
    assert back.config.rope_theta == model.config.rope_theta


def test_split_and_merge_are_inverse_and_follow_the_grouping(make_config):
    config = make_config(num_attention_heads=4, num_key_value_heads=2, hidden_size=8)
    rows = torch.arange(16 * 8, dtype=torch.float32).reshape(16, 8)  # (4 + 2*2) heads x head_dim 2
    q, k, v = split_wqkv(rows, config)
    # group 0 = rows 0..7 = q0 q1 k0 v0, group 1 = rows 8..15 = q2 q3 k1 v1
    assert torch.equal(q, torch.cat([rows[0:4], rows[8:12]]))
    assert torch.equal(k, torch.cat([rows[4:6], rows[12:14]]))
    assert torch.equal(v, torch.cat([rows[6:8], rows[14:16]]))
    assert torch.equal(merge_wqkv(q, k, v, config), rows)
