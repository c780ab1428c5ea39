"""LAVIS's EVA ViT and Q-Former attention: the fused forwards of ``blip2_internlm.models.attention``."""

from blip2_internlm.compat.fixes import fix


@fix
def fused_attention_in_eva_vit_and_qformer():
    """LAVIS computes ViT and Q-Former attention by hand; use torch's fused scaled_dot_product_attention (switch: attn_implementation / $BLIP2_INTERNLM_ATTN=eager)."""
    from lavis.models.blip2_models.Qformer import BertSelfAttention
    from lavis.models.eva_vit import Attention

    from blip2_internlm.models.attention import eva_attention_forward, install, qformer_self_attention_forward

    install(Attention, eva_attention_forward)
    install(BertSelfAttention, qformer_self_attention_forward)
