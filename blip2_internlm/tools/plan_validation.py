"""Checking the memory planner against real training steps: ``plan --measure`` and ``plan --calibrate``.

:func:`measure_training_step` runs LAVIS's training step (AdamW with LAVIS's weight-decay groups,
fp16 autocast + GradScaler when ``amp``) on a model with random weights and reports its peak
memory: torch's CUDA allocator peak on a GPU, the live tensor bytes
(:class:`blip2_internlm.tools.measure.LiveTensorBytes`) on the CPU.  The calibration set is a handful of
small architectures at which activations dominate as they do at full size, cheap enough for the
CPU.  ``blip2_internlm.tools.plan`` builds the models and puts its predictions next to these
measurements; the method and the numbers are in docs/plan.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blip2_internlm.paths import TINY_RUN_CONFIG_DIR
from blip2_internlm.tools.measure import LiveTensorBytes, peak_memory, reset_peak_memory, sync

# --- one measured training step ----------------------------------------------------------------


def synthetic_samples(a, batch: int, device):
    """A batch that fills ``max_txt_len``: every word is one token for the stub tokenizers.

    ``a``: the planner's description of the model (``plan.Arch``): image size and ``max_txt_len``.
    """
    import torch

    words = " ".join(f"w{i}" for i in range(a.qformer.max_txt_len + 8))
    return {
        "image": torch.randn(batch, 3, a.vit.image_size, a.vit.image_size, device=device),
        "text_input": [words] * batch,
    }


def lavis_adamw(model):
    """The optimizer LAVIS's runner builds: AdamW, weight decay 0.05 except on biases, norms and
    other 1-d parameters."""
    import torch

    p_wd, p_non_wd = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (p_non_wd if param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name else p_wd).append(param)
    return torch.optim.AdamW(
        [{"params": p_wd, "weight_decay": 0.05}, {"params": p_non_wd, "weight_decay": 0}], lr=1e-5, betas=(0.9, 0.999)
    )


def measure_training_step(model, make_samples: Callable[[], dict], device: str, amp: bool, steps: int = 2) -> dict:
    """Peak memory of ``steps`` training steps of ``model`` on ``make_samples()`` batches, after
    warm-up steps that create AdamW's state.

    Returns ``measured_peak`` and ``resident`` (what is allocated before a step: weights, buffers,
    optimizer state), ``measured_end_of_forward`` (allocated when the loss exists), the number of
    optimizer states, torch's version; on CUDA also the allocator's reserved peak, the device's
    used and total memory and its name.
    """
    import torch

    on_cuda = device.startswith("cuda")
    model.train()
    optimizer = lavis_adamw(model)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if amp else None
    tracker = None
    end_of_forward = 0

    def step():
        nonlocal end_of_forward
        samples = make_samples()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = model(samples)["loss"]
        end_of_forward = torch.cuda.memory_allocated() if on_cuda else getattr(tracker, "current", 0)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    warm = 0
    while not optimizer.state and warm < 6:  # GradScaler skips steps with inf gradients
        step()
        warm += 1
    result = {}
    if on_cuda:
        sync(device)
        base = reset_peak_memory(device)
        for _ in range(steps):
            step()
        sync(device)
        result.update(
            measured_peak=peak_memory(device),
            measured_reserved=torch.cuda.max_memory_reserved(),
            resident=base,
        )
        try:
            free, total = torch.cuda.mem_get_info()
            result.update(device_used=total - free, device_total=total)
        except Exception:  # pragma: no cover
            pass
    else:
        tracker = LiveTensorBytes()
        tracker.add(
            model.parameters(),
            model.buffers(),
            (t for state in optimizer.state.values() for t in state.values() if hasattr(t, "untyped_storage")),
        )
        resident = tracker.current
        with tracker:
            for _ in range(steps):
                step()
        result.update(measured_peak=tracker.peak, resident=resident)
    result["measured_end_of_forward"] = end_of_forward
    result["optimizer_states"] = len(optimizer.state)
    result["torch"] = torch.__version__
    if on_cuda:
        result["gpu"] = torch.cuda.get_device_name()
    return result


# --- calibration set ---------------------------------------------------------------------------------------------

#: Small architectures for validating the activation model on the CPU: the real model code at
#: sizes where the activations dominate as they do at full size (257 ViT tokens as for ViT-g at
#: 224 px, a 4-layer Q-Former, 4-layer LLMs with vocabularies large enough that the loss head
#: matters).  Only config.json files are written: the measured models initialise weights randomly.
CALIBRATION_BERT = dict(
    vocab_size=2000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=128,
)
CALIBRATION_INTERNLM2 = dict(
    vocab_size=4000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=688,
    max_position_embeddings=512,
)
CALIBRATION_OPT = dict(
    vocab_size=4000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    ffn_dim=1024,
    word_embed_proj_dim=256,
    max_position_embeddings=512,
    dropout=0.0,
    attention_dropout=0.0,
)


def write_calibration_assets(directory) -> dict:
    """config.json files of the calibration BERT / InternLM2 / OPT under ``directory``."""
    from transformers import BertConfig, OPTConfig

    from blip2_internlm.internlm2.configuration import InternLM2Config

    directory = Path(directory)
    paths = {}
    for name, config in (
        ("bert", BertConfig(**CALIBRATION_BERT)),
        ("internlm2", InternLM2Config(**CALIBRATION_INTERNLM2)),
        ("opt", OPTConfig(**CALIBRATION_OPT)),
    ):
        (directory / name).mkdir(parents=True, exist_ok=True)
        config.to_json_file(str(directory / name / "config.json"))
        paths[name] = str(directory / name)
    return paths


def calibration_cases(directory) -> list:
    """(name, cfg_path, options, batch) of the CPU validation runs; the configs are the repository's
    ``configs/tiny`` run configs with ``--options`` overrides."""
    if not TINY_RUN_CONFIG_DIR.is_dir():
        raise FileNotFoundError(f"no {TINY_RUN_CONFIG_DIR}: the calibration runs use the repository's configs/tiny")
    paths = write_calibration_assets(directory)
    small = [
        f"model.qformer_text_model={paths['bert']}",
        "model.num_query_token=16",
        "model.image_size=128",
        "model.max_txt_len=24",
    ]
    stage1 = str(TINY_RUN_CONFIG_DIR / "pretrain_stage1.yaml")
    stage2 = str(TINY_RUN_CONFIG_DIR / "pretrain_stage2.yaml")
    return [
        ("tiny stage 2 (InternLM2)", stage2, [], 8),
        ("tiny stage 1", stage1, [], 8),
        ("small stage 2, InternLM2 4x256", stage2, small + [f"model.llm_model={paths['internlm2']}"], 8),
        (
            "small stage 2, OPT 4x256",
            stage2,
            small + ["model.arch=blip2_opt_baseline", f"model.llm_model={paths['opt']}"],
            8,
        ),
        ("small stage 1", stage1, small, 8),
        (
            "small stage 2, trainable ViT",
            stage2,
            small + [f"model.llm_model={paths['internlm2']}", "model.freeze_vit=False"],
            4,
        ),
        (
            "small stage 2, trainable ViT + checkpointing",
            stage2,
            small
            + [f"model.llm_model={paths['internlm2']}", "model.freeze_vit=False", "model.use_grad_checkpoint=True"],
            4,
        ),
    ]


def format_calibration(rows: list) -> str:
    """The ``--calibrate`` table: one line per run, measured and predicted peak and the error."""
    lines = [f"{'calibration run':<46}{'batch':>6}{'measured MiB':>14}{'predicted MiB':>15}{'error':>8}"]
    for row in rows:
        lines.append(
            f"{row['name']:<46}{row['batch']:>6}{row['measured_peak'] / 2**20:>14.1f}"
            f"{row['predicted_peak'] / 2**20:>15.1f}{row['error']:>+8.1%}"
        )
    return "\n".join(lines)
