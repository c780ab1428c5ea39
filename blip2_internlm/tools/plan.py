"""GPU memory planner for this project's configs: does a run fit, and with what batch size?

    python -m blip2_internlm.tools.plan --cfg-path CFG [--gpus N] [--gpu-mem-gb G] [--options k=v ...]

prints, per GPU, the parameters by module and dtype, the training state (gradients, AdamW
moments, DDP buckets) of the trainable part, the activation memory of one training step at the
configured ``run.batch_size_train`` (with and without gradient checkpointing of the ViT), a CUDA
context and fragmentation allowance, and a verdict with the margin and the largest batch that
fits.  Evaluation configs (``run.evaluate: True``) get an inference estimate instead.  The model
is built on the ``meta`` device (``blip2_internlm.factory``): no weights, no downloads, no GPU.

    python -m blip2_internlm.tools.plan --cfg-path CFG --measure [--device cpu|cuda] [--batch B] [--options ...]

builds the same model with random weights on a real device, runs LAVIS's training step (AdamW,
fp16 autocast + GradScaler when ``run.amp`` on CUDA), and prints the measured peak next to the
prediction as JSON: torch's CUDA allocator peak on a GPU, the live tensor bytes counted at the
dispatcher (``blip2_internlm.tools.measure.LiveTensorBytes``) on the CPU.  ``--calibrate`` does so for a
set of small architectures.  The measuring side is ``blip2_internlm.tools.plan_validation``.

The activation model is analytic: for every layer it lists the tensors autograd saves for the
backward pass (and the few that are merely alive at the end of the forward pass), with their
dtypes under the configured precision.  The method and its validation are in docs/plan.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

GiB = 1024**3

#: Allowance for what PyTorch's allocator does not report: the CUDA context with cuBLAS/cuDNN
#: workspaces (measured on an H200, device used minus reserved: docs/plan.md, "Method") and,
#: with DDP, NCCL's buffers.
CUDA_CONTEXT_GIB = 0.75
NCCL_GIB = 0.25
#: Caching-allocator fragmentation: reserved minus allocated at the peak, as a share of the
#: allocated peak (measured below this with fixed-length batches: docs/plan.md; variable caption lengths vary the
#: block sizes from step to step, hence more).
FRAGMENTATION = 0.08

#: Order of the modules in the printed parameter table.
MODULE_ORDER = (
    "visual_encoder",
    "ln_vision",
    "Qformer",
    "query_tokens",
    "vision_proj",
    "text_proj",
    "itm_head",
    "temp",
    "llm_proj",
    "llm_model",
)


# --- architecture read off the (meta) model -------------------------------------------------------


@dataclass
class ViT:
    depth: int
    width: int
    heads: int
    mlp: int
    tokens: int  # patches + [CLS]
    image_size: int
    patch: int
    trainable: bool
    grad_checkpoint: bool
    weight_bytes: int  # element size of its Linear weights (fp16 after convert_weights_to_fp16)
    linear_numel: int
    sdpa: bool = False  # fused attention (blip2_internlm.models.attention): no saved probabilities


@dataclass
class QFormer:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    cross: list  # per layer: has cross-attention
    encoder_width: int
    vocab: int
    queries: int
    max_txt_len: int
    trainable_linear_numel: int  # fp32 Linear weights autocast copies to fp16 (Q-Former + projections)
    instruction_tokens: int = 0  # blip2_internlm_instruct: instruction tokens beside the queries (max_instruction_len)


@dataclass
class LLM:
    kind: str  # "internlm2" | "opt"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    param_bytes: int
    linear_numel: int
    logits_on_labels_only: bool = False  # Blip2InternLM.lm_head_on_labels_only
    autocast_bf16: bool = False  # model.autocast_dtype bf16 / auto: the model's own regions run in bf16 on GPUs
    # LoRA adapters (model.llm_lora), per token over all layers: the adapted linears' input widths, and their ranks
    lora_inputs: int = 0
    lora_ranks: int = 0
    lora_dropout: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads


@dataclass
class Arch:
    arch: str
    model_type: str
    stage: str  # "stage1" (blip2 Q-Former: ITC+ITM+ITG) | "stage2" (frozen LLM)
    vit: ViT
    qformer: QFormer
    llm: LLM | None
    params: list  # (module, dtype name, numel, bytes, trainable numel)
    trainable_numel: int
    trainable_bytes: int
    largest_trainable_numel: int
    buffer_bytes: int


def architecture_of(model, model_cfg) -> Arch:
    """Sizes, dtypes and trainable flags of a built (usually meta) model."""
    from torch import nn

    from blip2_internlm.dtypes import dtype_name

    stage = "stage2" if hasattr(model, "llm_model") else "stage1"
    vit = model.visual_encoder
    block = vit.blocks[0]
    vit_linear = [m.weight for m in vit.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    patch = vit.patch_embed.patch_size
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    img = vit.patch_embed.img_size
    img = img[0] if isinstance(img, (tuple, list)) else img
    from blip2_internlm.models.attention import uses_sdpa

    vit_arch = ViT(
        depth=len(vit.blocks),
        width=vit.num_features,
        heads=block.attn.num_heads,
        mlp=block.mlp.fc1.out_features,
        tokens=vit.patch_embed.num_patches + 1,
        image_size=img,
        patch=patch,
        trainable=any(p.requires_grad for p in vit.parameters()),
        grad_checkpoint=bool(getattr(vit, "use_checkpoint", False)),
        weight_bytes=vit_linear[-1].element_size(),
        linear_numel=sum(w.numel() for w in vit_linear),
        sdpa=uses_sdpa(block.attn),
    )
    qcfg = model.Qformer.config
    trainable_fp32_linears = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and not name.startswith(("llm_model", "visual_encoder"))
        and m.weight.requires_grad
        and m.weight.dtype.is_floating_point
        and m.weight.element_size() == 4
    ]
    if vit_arch.trainable:
        trainable_fp32_linears += [w for w in vit_linear if w.requires_grad and w.element_size() == 4]
    seen = set()
    linear_numel = 0
    for w in trainable_fp32_linears:
        if id(w) not in seen:
            seen.add(id(w))
            linear_numel += w.numel()
    qformer = QFormer(
        hidden=qcfg.hidden_size,
        layers=qcfg.num_hidden_layers,
        heads=qcfg.num_attention_heads,
        intermediate=qcfg.intermediate_size,
        cross=[bool(layer.has_cross_attention) for layer in model.Qformer.bert.encoder.layer],
        encoder_width=qcfg.encoder_width,
        vocab=model.Qformer.cls.predictions.decoder.out_features if model.Qformer.cls is not None else qcfg.vocab_size,
        queries=model.query_tokens.shape[1],
        max_txt_len=int(getattr(model, "max_txt_len", 32)),
        trainable_linear_numel=linear_numel,
        instruction_tokens=_instruction_tokens(model),
    )
    llm = None
    if stage == "stage2":
        cfg = model.llm_model.config
        kind = cfg.model_type
        llm_linears = [m.weight for m in model.llm_model.modules() if isinstance(m, nn.Linear)]
        llm = LLM(
            kind=kind,
            hidden=cfg.hidden_size,
            layers=cfg.num_hidden_layers,
            heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            ffn=getattr(cfg, "intermediate_size", None) or cfg.ffn_dim,
            vocab=cfg.vocab_size,
            param_bytes=next(model.llm_model.parameters()).element_size(),
            linear_numel=sum(w.numel() for w in {id(w): w for w in llm_linears}.values()),
            logits_on_labels_only=bool(getattr(model, "lm_head_on_labels_only", False)),
            # auto is bf16 on every GPU with bf16 (RTX 30xx/40xx, A100, H100), the ones planned for
            autocast_bf16=getattr(model, "autocast_dtype", "fp16") in ("bf16", "auto"),
            **_lora_sizes(model.llm_model),
        )
    rows = {}
    trainable = trainable_bytes = largest = 0
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        module = name.split(".")[0]
        dtype = dtype_name(param.dtype)
        row = rows.setdefault((module, dtype), [0, 0, 0])
        row[0] += param.numel()
        row[1] += param.numel() * param.element_size()
        if param.requires_grad:
            row[2] += param.numel()
            trainable += param.numel()
            trainable_bytes += param.numel() * param.element_size()
            largest = max(largest, param.numel())
    order = {name: i for i, name in enumerate(MODULE_ORDER)}
    params = sorted(
        ((module, dtype, *values) for (module, dtype), values in rows.items()),
        key=lambda row: (order.get(row[0], len(order)), row[0], row[1] != "fp32"),
    )
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Arch(
        arch=str(model_cfg.get("arch")),
        model_type=str(model_cfg.get("model_type")),
        stage=stage,
        vit=vit_arch,
        qformer=qformer,
        llm=llm,
        params=params,
        trainable_numel=trainable,
        trainable_bytes=trainable_bytes,
        largest_trainable_numel=largest,
        buffer_bytes=buffers,
    )


# --- the activation model -----------------------------------------------------------------------------


@dataclass
class Term:
    name: str
    bytes: float
    note: str = ""


@dataclass
class Precision:
    """Element sizes of one training step's tensors.

    ``amp``: LAVIS's runner wraps the step in ``torch.cuda.amp.autocast`` (fp16): matmuls run in
    fp16 and their activation inputs are cast (a new fp16 copy per call); softmax, layer_norm and
    cross-entropy run in fp32; fp32 parameters that require grad get one cached fp16 copy per
    step.  Without amp (CPU, or ``run.amp: False``) everything runs in the parameters' dtype.
    """

    amp: bool
    cuda: bool = True

    @property
    def lp(self) -> int:  # element size of matmul outputs
        return 2 if self.amp else 4

    @property
    def mask(self) -> int:
        """Bytes per element of a dropout mask: CUDA's fused dropout keeps a bool mask; the CPU
        path multiplies by a noise tensor of the input's dtype (fp32 here) and saves that."""
        return 1 if self.cuda else 4


def _qformer_layer(
    q: QFormer,
    p: Precision,
    rows: float,
    tokens: int,
    queries: int,
    keys: int,
    cross: bool,
    enc_rows_tokens: float,
    text_ffn_tokens: int,
) -> float:
    """Saved bytes of one Q-Former layer (LAVIS's BertLayer) for ``rows`` sequences.

    ``tokens``: sequence length of this pass; ``keys``: self-attention key length (longer than
    ``tokens`` for the ITG pass, which attends to the query pass's cached keys); ``queries``:
    how many leading tokens are queries (cross-attention + query FFN); ``text_ffn_tokens``:
    tokens through the text FFN; ``enc_rows_tokens``: rows * image tokens for cross-attention.
    Dropout (p=0.1 in BERT's config) is active: each dropout saves a mask (``Precision.mask``).
    """
    h, i, heads, w = q.hidden, q.intermediate, q.heads, q.encoder_width
    lp = p.lp
    t = rows * tokens
    b = 0.0
    # self-attention: q/k/v linear inputs, q/k/v outputs, softmax out + dropout mask + dropped probs,
    # context (input of the output dense), output dropout mask, LayerNorm input (fp32 residual sum)
    if p.amp:
        b += 3 * t * h * 2  # three separate fp16 casts of the fp32 layer input
    else:
        b += t * h * 4  # one fp32 layer input shared by q/k/v
    b += t * h * lp + 2 * rows * keys * h * lp  # q, k, v
    b += rows * heads * tokens * keys * (4 + p.mask + (2 if p.amp else 4))
    b += t * h * lp + t * h * p.mask + t * (h * 4 + 8)  # + LayerNorm mean/rstd
    if not p.amp:
        b += t * h * 4  # the self-attention output (LayerNorm output), saved by what reads it
    # cross-attention of the queries over the image tokens
    if cross and queries:
        tq = rows * queries
        if p.amp:
            b += tq * h * 2 + 2 * enc_rows_tokens * w * 2  # q input cast; k and v input casts
        b += tq * h * lp + 2 * enc_rows_tokens * h * lp  # q, k, v outputs
        b += rows * heads * queries * (enc_rows_tokens / rows) * (4 + p.mask + (2 if p.amp else 4))
        b += tq * h * lp + tq * h * p.mask + tq * (h * 4 + 8)
        if not p.amp:
            b += tq * h * 4  # cross-attention output, read by the query FFN
    # feed-forward: query FFN on the queries, text FFN on the text tokens
    for ffn_tokens in (queries, text_ffn_tokens):
        if not ffn_tokens:
            continue
        tf = rows * ffn_tokens
        if p.amp:
            b += tf * h * 2  # input cast of the intermediate dense
        b += 2 * tf * i * lp  # GELU input, output dense input
        b += tf * h * p.mask + tf * (h * 4 + 8)  # dropout mask, LayerNorm input
    return b


def _instruction_tokens(model) -> int:
    config = getattr(model, "model_config", None)
    return int(config.max_instruction_len) if getattr(config, "qformer_text_input", False) else 0


def _lora_sizes(llm) -> dict:
    """What the LoRA adapters of ``llm`` save per token: each adapted linear's input (for lora_A's gradient) and
    its rank-wide intermediate (for lora_B's)."""
    from torch.nn import Dropout

    inputs = ranks = 0
    dropout = False
    for module in llm.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            inputs += module.lora_A["default"].in_features
            ranks += module.lora_A["default"].out_features
            dropout = dropout or isinstance(module.lora_dropout["default"], Dropout)
    return {"lora_inputs": inputs, "lora_ranks": ranks, "lora_dropout": dropout}


def _qformer_pass(
    q: QFormer,
    p: Precision,
    rows: float,
    tokens: int,
    queries: int,
    keys: int = None,
    image_tokens: int = 0,
    text_ffn_tokens: int = 0,
    embeddings: bool = True,
) -> float:
    keys = tokens if keys is None else keys
    b = 0.0
    if embeddings:  # BertEmbeddings: LayerNorm input + dropout mask (+ fp32 output, the first layer input)
        b += rows * tokens * (q.hidden * (4 + p.mask) + 8)
    for cross in q.cross:
        b += _qformer_layer(
            q, p, rows, tokens, queries, keys, cross and image_tokens > 0, rows * image_tokens, text_ffn_tokens
        )
    return b


def _vit_block(v: ViT, p: Precision, rows: float) -> float:
    """Saved bytes of one trainable EVA ViT block (attn_drop and drop_path are 0: identity).

    Eager attention saves its probabilities (fp32 softmax, and their fp16 cast under autocast);
    SDPA saves one fp32 log-sum-exp per query row and head instead.
    """
    n, d, m, heads = rows * v.tokens, v.width, v.mlp, v.heads
    scores = rows * heads * v.tokens * (1 if v.sdpa else v.tokens)
    if p.amp:
        return n * (4 * d + 2 * d + 6 * d + 2 * d + 2 * d + 4 * d + 2 * d + 2 * m + 2 * m) + scores * (
            4 if v.sdpa else 4 + 2
        )
    return n * (4 * d + 4 * d + 12 * d + 4 * d + 4 * d + 4 * d + 4 * d + 4 * m + 4 * m) + scores * 4


def _llm_layer_per_token(llm: LLM, p: Precision) -> float:
    h, kv, f = llm.hidden, llm.kv_dim, llm.ffn
    if llm.kind == "opt":
        if p.amp:  # LN inputs (fp32 casts), q*scaling, k, v (also the KV cache), SDPA output, ReLU output
            return 4 * h + 2 * h + 2 * h + 2 * h + 2 * h + 4 * h + 2 * f
        return 4 * h + 4 * h + 4 * h + 4 * h + 4 * h + 4 * h + 4 * f  # the same, all fp32 (LN input = residual)
    # InternLM2 (llama-like, GQA).  amp with bf16 weights: fp16 matmuls meet bf16 norms/rotary
    # tables, so the residual stream and rotated q/k are fp32 (type promotion).
    if p.amp:
        return (
            4 * h  # attention_norm input (fp32 residual)
            + 4 * kv
            + 2 * (h + 2 * kv)  # KV cache: rotated k (fp32) + the wqkv output (v is a view)
            + 4 * 2 * h  # SDPA saves fp16 q, repeated k, repeated v, output
            + 4 * h  # ffn_norm input
            + 3 * 2 * f
        )  # SiLU input, SiLU output, up projection
    return (
        4 * h  # attention_norm input (the residual itself)
        + 4 * kv
        + 4 * (h + 2 * kv)  # KV cache: rotated k + the wqkv output
        + 4 * h
        + 4 * h
        + 4 * h
        + 4 * h  # SDPA saves rotated q, repeated k, repeated v, output
        + 4 * h  # ffn_norm input
        + 3 * 4 * f
    )  # SiLU input, SiLU output, up projection


def activation_terms(a: Arch, p: Precision, batch: int, world: int = 1, vit_checkpoint: bool | None = None) -> list:
    """Memory of one training step beyond the static state, at the end of the forward pass.

    Saved tensors (what backward needs), tensors still referenced then (inputs, gathered image
    features, the KV cache the LLM builds even in training), autocast's fp16 weight copies, and
    the loss head's peak (fp16 logits, their fp32 copy and log-softmax: ~12 bytes per logit).
    """
    v, q = a.vit, a.qformer
    ckpt = v.grad_checkpoint if vit_checkpoint is None else vit_checkpoint
    B = batch
    n_img = v.tokens
    terms = [Term("input images", B * 3 * v.image_size**2 * 4, "fp32")]
    # ViT
    if v.trainable:
        block = _vit_block(v, p, B)
        if ckpt:
            terms.append(
                Term(
                    "ViT (trainable, checkpointed)",
                    v.depth * B * n_img * v.width * 4 + block,
                    f"{v.depth} block inputs + one block recomputed",
                )
            )
        else:
            terms.append(Term("ViT (trainable)", v.depth * block, f"{v.depth} blocks x {block / GiB:.3f} GiB"))
    else:
        terms.append(Term("ViT (frozen)", 0.0, "no graph: nothing saved"))
    # ln_vision (trainable LayerNorm): saves the ViT output (fp32 residual stream)
    terms.append(Term("ln_vision", B * n_img * v.width * 4, "input, fp32"))
    tq, tt = q.queries, q.max_txt_len
    enc = 0 if p.amp else B * n_img * v.width * 4  # fp32 image embeddings shared by all K/V linears
    if a.stage == "stage1":
        itm_rows = 3 * B
        qf = _qformer_pass(q, p, B, tq, tq, image_tokens=n_img)  # image -> queries (ITC)
        qf += _qformer_pass(q, p, B, tt, 0, text_ffn_tokens=tt)  # text (ITC)
        qf += _qformer_pass(q, p, itm_rows, tq + tt, tq, image_tokens=n_img, text_ffn_tokens=tt)  # ITM
        qf += _qformer_pass(q, p, B, tt, 0, keys=tq + tt, text_ffn_tokens=tt)  # ITG (cached query keys)
        terms.append(
            Term(
                "Q-Former: ITC image + text, ITM (3B rows), ITG passes",
                qf,
                f"{len(q.cross)} layers, {tq} queries, {tt} text tokens",
            )
        )
        if p.amp:  # fp16 casts of what vision_proj, text_proj ([CLS]) and itm_head read
            heads = (B * tq + B + itm_rows * tq) * q.hidden * 2
        else:  # the fp32 outputs they read (a slice keeps its whole tensor alive)
            heads = (B * tq + B * tt + itm_rows * (tq + tt)) * q.hidden * 4
        # ITG LM head: transform dense + GELU + LayerNorm inputs, decoder input
        heads += B * tt * q.hidden * ((2 + 2 + 4 + 2) if p.amp else (4 + 4 + 4 + 4))
        terms.append(Term("Q-Former heads (projections, ITM, LM transform)", heads))
        # image features gathered over ranks for ITM negatives: world*B + B + 3B rows of fp32
        gathered = ((world if world > 1 else 0) + 1 + 3) * B * n_img * v.width * 4
        terms.append(Term("ITM image features (gathered, negatives, 3B concat)", gathered, "fp32"))
        terms.append(Term("image embeddings (ln_vision output)", B * n_img * v.width * 4, "fp32"))
        terms.append(
            Term(
                f"ITG loss head (vocab {q.vocab})",
                12 * B * tt * q.vocab,
                "logits, fp32 copy, log-softmax, its gradient",
            )
        )
    elif q.instruction_tokens:
        ti = q.instruction_tokens
        qf = _qformer_pass(q, p, B, tq + ti, tq, image_tokens=n_img, text_ffn_tokens=ti)
        terms.append(
            Term(
                "Q-Former (queries and instruction)",
                qf + enc,
                f"{len(q.cross)} layers, {tq} queries + {ti} instruction tokens (max_instruction_len)",
            )
        )
    else:
        qf = _qformer_pass(q, p, B, tq, tq, image_tokens=n_img)
        terms.append(Term("Q-Former (queries only)", qf + enc, f"{len(q.cross)} layers, {tq} queries"))
    if a.llm is not None:
        terms.append(Term("llm_proj input", B * tq * q.hidden * (2 if p.amp else 4)))
        llm = a.llm
        L = tq + tt
        n = B * L
        per_layer = _llm_layer_per_token(llm, p) * n
        terms.append(
            Term(
                f"LLM layers (frozen, back-propagated), {L} tokens x {B}",
                llm.layers * per_layer,
                f"{llm.layers} x {per_layer / GiB:.3f} GiB",
            )
        )
        terms.append(Term("LLM final norm input", n * llm.hidden * 4))
        if llm.lora_inputs:
            # each adapter saves its input (its own dropout output and mask with dropout) and its rank-r output
            per_token = llm.lora_inputs * (p.lp + (p.lp + 1 if llm.lora_dropout else 0)) + llm.lora_ranks * p.lp
            terms.append(
                Term(
                    "LoRA adapters' saved inputs",
                    n * per_token,
                    f"{llm.lora_inputs} input and {llm.lora_ranks} rank elements per token over the layers",
                )
            )
        if llm.logits_on_labels_only:  # at most every text token after <s> has a label
            rows = B * (tt - 1)
            terms.append(
                Term(
                    f"LLM loss head (vocab {llm.vocab}), {tt - 1} labelled tokens x {B}",
                    12 * rows * llm.vocab + rows * llm.hidden * 4,
                    "fp16 logits, fp32 copy, log-softmax, its gradient; gathered hidden states",
                )
            )
        else:
            terms.append(
                Term(
                    f"LLM loss head (vocab {llm.vocab})",
                    12 * n * llm.vocab,
                    "fp16 logits, fp32 copy, log-softmax, its gradient",
                )
            )
        if p.amp and llm.param_bytes == 2 and not _llm_is_fp16(a) and not llm.autocast_bf16:
            terms.append(
                Term(
                    "LLM weights cast to fp16 by autocast (bf16 != fp16)",
                    llm.linear_numel * 2,
                    "saved for the backward pass through each frozen Linear",
                )
            )
        elif p.amp and llm.param_bytes == 4:
            terms.append(Term("LLM weights cast to fp16 by autocast", llm.linear_numel * 2))
    if p.amp:
        terms.append(Term("trainable fp32 weights cached in fp16 by autocast", q.trainable_linear_numel * 2))
    return terms


def _llm_is_fp16(a: Arch) -> bool:
    return any(module == "llm_model" and dtype == "fp16" for module, dtype, *_ in a.params)


def vit_forward_transient(a: Arch, p: Precision, batch: int) -> float:
    """Working memory inside one frozen ViT block (nothing is kept): residual, norm output,
    qkv, attention scores and probabilities, MLP hidden."""
    v = a.vit
    n = batch * v.tokens
    attn = batch * v.heads * v.tokens**2
    return n * v.width * (4 + 4 + 3 * p.lp) + attn * (p.lp + 4) + n * v.mlp * p.lp * 2


# --- the plan -------------------------------------------------------------------------------------------


@dataclass
class Plan:
    cfg_path: str
    arch: Arch
    training: bool
    batch: int
    gpus: int
    gpu_mem_gib: float
    amp: bool
    ddp: bool
    params_bytes: float
    state_terms: list
    act_terms: list
    act_terms_other_ckpt: list | None
    phases: dict
    peak_allocated: float
    context: float
    fragmentation: float
    total: float
    fits: bool
    margin: float
    max_batch: int
    extra: dict = field(default_factory=dict)


def _run_value(run, key, default):
    value = run.get(key, default) if run is not None else default
    return default if value is None else value


def static_terms(a: Arch, ddp: bool, on_cuda: bool, training: bool) -> list:
    if not training:
        return []
    t = a.trainable_bytes
    return [
        Term("gradients (trainable, fp32)", t),
        Term("AdamW exp_avg + exp_avg_sq (fp32)", 2 * t),
        Term("DDP gradient buckets", t if ddp else 0.0, "gradient_as_bucket_view=False: a second copy"),
        Term(
            "optimizer step temporaries",
            t if on_cuda else a.largest_trainable_numel * 4,
            "foreach AdamW: one trainable-sized temporary" if on_cuda else "per-tensor AdamW",
        ),
    ]


def training_peak(
    a: Arch, p: Precision, batch: int, world: int, ddp: bool, on_cuda: bool, vit_checkpoint: bool | None = None
) -> tuple:
    """(peak allocated bytes, phases, activation terms)."""
    params = sum(row[3] for row in a.params) + a.buffer_bytes
    st = {term.name: term.bytes for term in static_terms(a, ddp, on_cuda, True)}
    grads, adam = st["gradients (trainable, fp32)"], st["AdamW exp_avg + exp_avg_sq (fp32)"]
    buckets, step_tmp = st["DDP gradient buckets"], st["optimizer step temporaries"]
    acts = activation_terms(a, p, batch, world, vit_checkpoint)
    act = sum(t.bytes for t in acts)
    resident = params + adam + buckets
    images = batch * 3 * a.vit.image_size**2 * 4
    phases = {
        "ViT forward": resident + images + vit_forward_transient(a, p, batch),
        "end of forward / start of backward": resident + act,
        "optimizer step": resident + grads + step_tmp,
    }
    return max(phases.values()), phases, acts


def inference_peak(a: Arch, p: Precision, batch: int, run) -> tuple:
    """A rough estimate for evaluation: weights, ViT working set, and generation (beam search KV
    cache and logits).  Not validated like the training model."""
    params = sum(row[3] for row in a.params) + a.buffer_bytes
    beams = int(_run_value(run, "num_beams", 5))
    max_len = int(_run_value(run, "max_len", 30))
    terms = [Term("ViT forward working set", vit_forward_transient(a, p, batch))]
    if a.llm is not None:
        llm = a.llm
        prompt = 16
        seq = a.qformer.queries + prompt + max_len
        rows = batch * beams
        kv = rows * seq * llm.layers * 2 * llm.kv_dim * 2
        terms.append(Term(f"KV cache ({rows} beams x {seq} tokens)", kv))
        terms.append(
            Term(
                "prefill working set (one layer)",
                rows * (a.qformer.queries + prompt) * (4 * llm.hidden * 4 + 3 * llm.ffn * 2),
            )
        )
        terms.append(Term("logits and beam scores (fp32)", 3 * rows * llm.vocab * 4))
        if p.amp and llm.param_bytes == 2 and not _llm_is_fp16(a) and not llm.autocast_bf16:
            terms.append(Term("one layer's weights cast to fp16", llm.linear_numel / max(llm.layers, 1) * 2))
    else:
        terms.append(
            Term(
                "Q-Former working set",
                _qformer_pass(
                    a.qformer,
                    p,
                    batch * 3,
                    a.qformer.queries + a.qformer.max_txt_len,
                    a.qformer.queries,
                    image_tokens=a.vit.tokens,
                ),
            )
        )
    act = sum(t.bytes for t in terms)
    return params + act, {"inference": params + act}, terms


def make_plan(
    cfg_path, gpus: int | None = None, gpu_mem_gb: float = 24.0, options=(), batch: int | None = None
) -> Plan:
    """Plan ``cfg_path`` (+ ``--options``) for ``gpus`` GPUs of ``gpu_mem_gb`` GiB each."""
    cfg = load_config(cfg_path, options)
    model_cfg, run = cfg.model, cfg.run
    model = build_configured_model(cfg_path, options, weights="meta")
    a = architecture_of(model, model_cfg)
    device = str(_run_value(run, "device", "cuda"))
    on_cuda = device.startswith("cuda")
    amp = bool(_run_value(run, "amp", False)) and on_cuda
    p = Precision(amp=amp, cuda=on_cuda)
    training = not bool(_run_value(run, "evaluate", False))
    gpus = int(gpus if gpus is not None else _run_value(run, "world_size", 1))
    ddp = training and bool(_run_value(run, "distributed", False))
    key = "batch_size_train" if training else "batch_size_eval"
    batch = int(batch if batch is not None else _run_value(run, key, 1))
    capacity = gpu_mem_gb * GiB

    def peak(b, ckpt=None):
        if training:
            return training_peak(a, p, b, gpus, ddp, on_cuda, ckpt)
        return inference_peak(a, p, b, run)

    context = (CUDA_CONTEXT_GIB + (NCCL_GIB if ddp and gpus > 1 else 0.0)) * GiB if on_cuda else 0.0

    def total(alloc):
        return alloc * (1 + FRAGMENTATION) + context if on_cuda else alloc

    alloc, phases, acts = peak(batch)
    other = None
    if training and a.vit.trainable:
        other = peak(batch, not a.vit.grad_checkpoint)[2]
    elif training:
        other = acts  # frozen ViT: checkpointing changes nothing
    tot = total(alloc)
    max_batch = 0
    lo, hi = 0, 1
    while hi <= 4096 and total(peak(hi)[0]) <= capacity:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(peak(mid)[0]) <= capacity else (lo, mid)
    max_batch = lo
    params_bytes = sum(row[3] for row in a.params)
    return Plan(
        cfg_path=str(cfg_path),
        arch=a,
        training=training,
        batch=batch,
        gpus=gpus,
        gpu_mem_gib=gpu_mem_gb,
        amp=amp,
        ddp=ddp,
        params_bytes=params_bytes,
        state_terms=static_terms(a, ddp, on_cuda, training),
        act_terms=acts,
        act_terms_other_ckpt=other,
        phases=phases,
        peak_allocated=alloc,
        context=context,
        fragmentation=alloc * FRAGMENTATION if on_cuda else 0.0,
        total=tot,
        fits=tot <= capacity,
        margin=capacity - tot,
        max_batch=max_batch,
        extra={"device": device},
    )


def build_configured_model(cfg_path, options=(), weights="meta", device=None):
    """The model of ``cfg_path`` and the ``model.`` keys of ``--options``, as a run would train it:
    on ``meta`` for a plan, with random weights on ``device`` for a measurement."""
    from blip2_internlm.factory import build_model, parse_model_options

    model_options = parse_model_options(options, run_sections=True)
    return build_model(cfg_path=cfg_path, options=model_options, weights=weights, device=device, is_eval=False)


def load_config(cfg_path, options=()):
    """The config LAVIS's ``Config`` builds (run + model with its type's defaults + datasets)."""
    from types import SimpleNamespace

    from lavis.common.config import Config

    import blip2_internlm  # noqa: F401

    return Config(SimpleNamespace(cfg_path=str(cfg_path), options=list(options) or None)).config


def _g(x: float) -> str:
    return f"{x / GiB:8.2f}"


def format_plan(plan: Plan) -> str:
    a = plan.arch
    v, q = a.vit, a.qformer
    lines = []
    mode = "training" if plan.training else "evaluation"
    prec = "amp (fp16 autocast)" if plan.amp else "no autocast"
    if plan.amp and plan.arch.llm is not None and plan.arch.llm.autocast_bf16:
        prec = "amp (fp16 autocast, the model's own regions bf16: autocast_dtype)"
    lines.append(f"Memory plan for {plan.cfg_path}")
    lines.append(
        f"  {a.arch} / {a.model_type}: {mode}, batch {plan.batch} per GPU x {plan.gpus} GPU(s) of "
        f"{plan.gpu_mem_gib:g} GiB, {prec}{', DDP' if plan.ddp else ''}, device {plan.extra['device']}"
    )
    seq = (
        f"  ViT {v.depth}x{v.width} on {v.tokens} tokens ({v.image_size} px / {v.patch}), "
        f"Q-Former {q.layers}x{q.hidden}, {q.queries} queries"
    )
    if a.llm is not None:
        seq += f", LLM {a.llm.kind} {a.llm.layers}x{a.llm.hidden} on {q.queries} + {q.max_txt_len} tokens (max_txt_len)"
    else:
        seq += f", {q.max_txt_len} text tokens"
    lines.append(seq)
    lines.append("")
    lines.append(f"{'Parameters per GPU':<26}{'count':>14}  {'dtype':<5} {'GiB':>8}  {'trainable':>12}")
    for module, dtype, numel, nbytes, trainable in a.params:
        lines.append(f"  {module:<24}{numel:>14,}  {dtype:<5} {_g(nbytes)}  {trainable:>12,}")
    lines.append(
        f"  {'total':<24}{sum(r[2] for r in a.params):>14,}        {_g(plan.params_bytes)}  {a.trainable_numel:>12,}"
    )
    if plan.training:
        lines.append("")
        lines.append(f"Training state of the {a.trainable_numel:,} trainable parameters (GiB)")
        for term in plan.state_terms:
            lines.append(f"  {term.name:<52}{_g(term.bytes)}  {term.note}".rstrip())
        lines.append("")
        other_name = "with" if not v.grad_checkpoint else "without"
        cur_name = "without" if not v.grad_checkpoint else "with"
        lines.append(f"Activations at batch {plan.batch}, {cur_name} ViT gradient checkpointing (GiB)")
        for term in plan.act_terms:
            lines.append(f"  {term.name:<52}{_g(term.bytes)}  {term.note}".rstrip())
        act = sum(t.bytes for t in plan.act_terms)
        lines.append(f"  {'total':<52}{_g(act)}")
        if plan.act_terms_other_ckpt is not None:
            other = sum(t.bytes for t in plan.act_terms_other_ckpt)
            why = "" if v.trainable else " (the ViT is frozen: it saves nothing either way)"
            lines.append(f"  {other_name} ViT gradient checkpointing (use_grad_checkpoint): {other / GiB:.2f} GiB{why}")
    else:
        lines.append("")
        lines.append(f"Inference at batch {plan.batch}, a rough estimate (GiB)")
        for term in plan.act_terms:
            lines.append(f"  {term.name:<52}{_g(term.bytes)}")
    lines.append("")
    lines.append("Peak per GPU (GiB)")
    for name, value in plan.phases.items():
        lines.append(f"  {name:<52}{_g(value)}")
    lines.append(f"  {'peak allocated by PyTorch':<52}{_g(plan.peak_allocated)}")
    if plan.context:
        lines.append(
            f"  {'CUDA context, cuBLAS' + (', NCCL' if plan.ddp and plan.gpus > 1 else ''):<52}{_g(plan.context)}"
        )
        lines.append(f"  {f'allocator fragmentation ({FRAGMENTATION:.0%})':<52}{_g(plan.fragmentation)}")
    lines.append(f"  {'total':<52}{_g(plan.total)}")
    lines.append("")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    share = plan.margin / (plan.gpu_mem_gib * GiB)
    largest = f"{plan.max_batch} per GPU" if plan.max_batch else "none, not even 1"
    lines.append(
        f"Verdict: {verdict} in {plan.gpu_mem_gib:g} GiB: margin {plan.margin / GiB:+.2f} GiB ({share:+.0%}); "
        f"largest batch that fits: {largest}"
    )
    return "\n".join(lines)


# --- measurement (validation) ----------------------------------------------------------------------------


def measure(cfg_path, options=(), batch: int | None = None, device: str = "cpu", steps: int = 2) -> dict:
    """Run LAVIS's training step with random weights and return measured and predicted peaks
    (the measuring itself: :func:`blip2_internlm.tools.plan_validation.measure_training_step`)."""
    import torch

    from blip2_internlm.tools.plan_validation import measure_training_step, synthetic_samples

    cfg = load_config(cfg_path, options)
    model_cfg, run = cfg.model, cfg.run
    torch.manual_seed(0)
    model = build_configured_model(cfg_path, options, weights="random", device=device)
    a = architecture_of(model, model_cfg)
    on_cuda = device.startswith("cuda")
    amp = bool(_run_value(run, "amp", False)) and on_cuda
    batch = int(batch if batch is not None else _run_value(run, "batch_size_train", 1))
    result = {"cfg_path": str(cfg_path), "options": list(options), "batch": batch, "device": device, "amp": amp}
    result.update(measure_training_step(model, lambda: synthetic_samples(a, batch, device), device, amp, steps))
    p = Precision(amp=amp, cuda=on_cuda)
    predicted, phases, acts = training_peak(a, p, batch, 1, False, on_cuda)
    result.update(
        predicted_peak=predicted,
        predicted_phases=phases,
        predicted_activations={t.name: t.bytes for t in acts},
        error=(predicted - result["measured_peak"]) / result["measured_peak"],
    )
    return result


def calibrate(directory, device="cpu") -> list:
    """:func:`measure` on each of :func:`blip2_internlm.tools.plan_validation.calibration_cases`."""
    from blip2_internlm.tools.plan_validation import calibration_cases

    rows = []
    for name, cfg_path, options, batch in calibration_cases(directory):
        result = measure(cfg_path, options, batch, device)
        result["name"] = name
        rows.append(result)
    return rows


# --- command line ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip2_internlm.tools.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs (DDP ranks); default run.world_size")
    parser.add_argument("--gpu-mem-gb", type=float, default=24.0, help="memory per GPU in GiB (default 24: RTX 4090)")
    parser.add_argument("--batch", type=int, default=None, help="batch size per GPU (default: the config's)")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides, key=value, as for train/evaluate")
    parser.add_argument("--measure", action="store_true", help="run a training step with random weights and compare")
    parser.add_argument("--device", default="cpu", help="device for --measure (cpu or cuda)")
    parser.add_argument("--calibrate", action="store_true", help="measure the small calibration configs on --device")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.calibrate:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            rows = calibrate(directory, args.device)
        from blip2_internlm.tools.plan_validation import format_calibration

        print(format_calibration(rows))
        return 0
    if not args.cfg_path:
        parser.error("--cfg-path is required")
    if args.measure:
        result = measure(args.cfg_path, args.options, args.batch, args.device)
        print(json.dumps(result, indent=1, default=str))
        return 0
    plan = make_plan(args.cfg_path, args.gpus, args.gpu_mem_gb, args.options, args.batch)
    if args.json:
        print(
            json.dumps(
                {
                    "cfg_path": plan.cfg_path,
                    "batch": plan.batch,
                    "gpus": plan.gpus,
                    "gpu_mem_gib": plan.gpu_mem_gib,
                    "peak_allocated_gib": plan.peak_allocated / GiB,
                    "total_gib": plan.total / GiB,
                    "fits": plan.fits,
                    "margin_gib": plan.margin / GiB,
                    "max_batch": plan.max_batch,
                },
                indent=1,
            )
        )
    else:
        print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
