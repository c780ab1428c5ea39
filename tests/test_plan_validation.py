"""The measuring side of the memory planner's checks (``blip2_internlm.tools.plan_validation``): the
training step it measures is LAVIS's, the CPU reading counts what that step keeps alive, and the
calibration set points at real configs.  The planner against those measurements is in
tests/test_plan.py.
"""

from pathlib import Path
from types import SimpleNamespace

import torch

from blip2_internlm.tools import plan_validation

MiB = 2**20


class Regression(torch.nn.Module):
    """A model as LAVIS's runner sees one: ``model(samples)["loss"]``."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(256, 512)
        self.ln_out = torch.nn.LayerNorm(512)
        self.frozen = torch.nn.Linear(512, 1)
        self.frozen.requires_grad_(False)

    def forward(self, samples):
        return {"loss": self.frozen(self.ln_out(self.proj(samples["x"]))).pow(2).mean()}


def test_the_optimizer_is_lavis_adamw_with_decay_on_matrices_only():
    model = Regression()
    optimizer = plan_validation.lavis_adamw(model)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    assert [p.shape for p in decay["params"]] == [model.proj.weight.shape]
    assert len(no_decay["params"]) == 3  # proj.bias, ln_out.weight, ln_out.bias; frozen: none
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_a_cpu_step_keeps_weights_and_adamw_state_resident_and_peaks_above_them():
    torch.manual_seed(0)
    model = Regression()
    batch = 64
    result = plan_validation.measure_training_step(model, lambda: {"x": torch.randn(batch, 256)}, "cpu", amp=False)
    assert result["optimizer_states"] == 4  # the trainable tensors; the frozen Linear has none
    weights = sum(p.numel() * 4 for p in model.parameters())
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    # weights + AdamW's two moments (+ its step counters, a few bytes each)
    assert weights + 2 * trainable <= result["resident"] < weights + 2 * trainable + 4096
    # the loss exists: the batch and the Linear's output (saved by the LayerNorm) are alive too
    assert result["measured_end_of_forward"] >= result["resident"] + batch * (256 + 512) * 4
    # and before the optimizer step, the gradients
    assert result["measured_peak"] >= max(result["resident"] + trainable, result["measured_end_of_forward"])
    assert {"measured_reserved", "device_used", "gpu"}.isdisjoint(result)  # CUDA-only readings


def test_synthetic_samples_fill_the_text_length_and_the_image_size():
    arch = SimpleNamespace(qformer=SimpleNamespace(max_txt_len=24), vit=SimpleNamespace(image_size=32))
    samples = plan_validation.synthetic_samples(arch, 3, "cpu")
    assert samples["image"].shape == (3, 3, 32, 32)
    assert len(samples["text_input"]) == 3 and len(samples["text_input"][0].split()) == 24 + 8


def test_calibration_cases_use_the_repository_tiny_configs_and_write_loadable_model_configs(tmp_path):
    from transformers import AutoConfig

    cases = plan_validation.calibration_cases(tmp_path)
    assert len({name for name, *_ in cases}) == len(cases) == 7
    for _, cfg_path, options, batch in cases:
        assert Path(cfg_path).parent == plan_validation.TINY_RUN_CONFIG_DIR and Path(cfg_path).is_file() and batch > 0
        for option in options:
            key, value = option.split("=", 1)
            if key in ("model.qformer_text_model", "model.llm_model"):
                assert (tmp_path / value.rsplit("/", 1)[1] / "config.json").is_file()
    assert AutoConfig.from_pretrained(tmp_path / "opt").hidden_size == 256
