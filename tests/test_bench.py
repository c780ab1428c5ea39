"""The benchmark harness ``python -m blip2_internlm.tools.bench``: it runs, it writes its JSON, and it
compares like with like (LAVIS's own Blip2OPT against Blip2InternLM at matched sizes).

No test here checks a timing: the harness measures, these specs check what it measures.
"""

import contextlib
import io
import json

import pytest
import torch

from blip2_internlm import hardware
from blip2_internlm.tools import bench


@pytest.fixture(scope="module")
def tiny_pair():
    size = bench.load_size("tiny")
    return size, bench.build_ours(size, "cpu"), bench.build_baseline(size, "cpu", opt_dtype="fp32")


def _mlp_params(module_names_params, words):
    return sum(p.numel() for name, p in module_names_params if any(w in name for w in words))


def test_the_baseline_is_lavis_own_blip2_opt_with_its_vendored_opt(tiny_pair):
    from lavis.models.blip2_models.blip2_opt import Blip2OPT
    from lavis.models.blip2_models.modeling_opt import OPTForCausalLM

    _, ours, baseline = tiny_pair
    # LAVIS's class, told only where its BERT and ViT weights come from: the code that runs is its own
    assert isinstance(baseline, Blip2OPT)
    own = {name for name in vars(type(baseline)) if not name.startswith("__")}
    assert own <= {"_abc_impl"}, own
    for name in ("forward", "generate", "maybe_autocast"):
        assert getattr(type(baseline), name) is getattr(Blip2OPT, name), name
    assert type(baseline.opt_model) is OPTForCausalLM
    assert type(ours).__name__ == "Blip2InternLM"


def test_as_shipped_the_baseline_loads_its_opt_in_fp16():
    from lavis.models.blip2_models.blip2_opt import Blip2OPT

    size = bench.load_size("tiny")
    model = bench.build_baseline(size, "cpu")
    assert isinstance(model, Blip2OPT) and model.opt_model.dtype == torch.float16


def test_both_sides_share_the_same_vit_and_qformer(tiny_pair):
    _, ours, baseline = tiny_pair
    ours_vit, base_vit = ours.visual_encoder.state_dict(), baseline.visual_encoder.state_dict()
    assert ours_vit.keys() == base_vit.keys()
    assert all(torch.equal(ours_vit[k], base_vit[k]) for k in ours_vit), "same seed, same ViT weights"
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours.Qformer) == count(baseline.Qformer)
    assert ours.query_tokens.shape == baseline.query_tokens.shape


@pytest.mark.parametrize("size_name", ["tiny", "small", "real"])
def test_llms_match_in_width_depth_heads_vocab_and_mlp_parameters(size_name):
    size = bench.load_size(size_name)
    internlm2, opt = bench.internlm2_config(size), bench.opt_config(size)
    assert (internlm2.hidden_size, internlm2.num_hidden_layers, internlm2.num_attention_heads) == (
        opt.hidden_size,
        opt.num_hidden_layers,
        opt.num_attention_heads,
    )
    assert internlm2.vocab_size == opt.vocab_size
    swiglu = 3 * internlm2.hidden_size * internlm2.intermediate_size
    relu = 2 * opt.hidden_size * opt.ffn_dim
    if size_name != "real":  # real: InternLM2-1.8B's own SwiGLU width against OPT's 4x
        assert abs(swiglu - relu) / relu < 0.01


def test_built_models_have_the_configured_llm_shapes(tiny_pair):
    size, ours, baseline = tiny_pair
    llm = size["llm"]
    ours_layers = ours.llm_model.model.layers if hasattr(ours.llm_model.model, "layers") else None
    assert len(ours_layers) == len(baseline.opt_model.model.decoder.layers) == llm["num_hidden_layers"]
    assert ours.llm_model.get_input_embeddings().weight.shape == baseline.opt_model.get_input_embeddings().weight.shape
    ours_mlp = _mlp_params(ours.llm_model.named_parameters(), ("feed_forward", "mlp"))
    base_mlp = _mlp_params(baseline.opt_model.named_parameters(), ("fc1", "fc2"))
    assert abs(ours_mlp - base_mlp) / base_mlp < 0.01


def test_small_size_is_vit_12x384_at_224_qformer_4x256_llm_8x512():
    from blip2_internlm.models.vision import VIT_ARCHS

    size = bench.load_size("small")
    vit = VIT_ARCHS[size["vit_model"]]
    assert (vit["depth"], vit["embed_dim"], size["image_size"]) == (12, 384, 224)
    assert (size["qformer"]["num_hidden_layers"], size["qformer"]["hidden_size"]) == (4, 256)
    assert (size["llm"]["num_hidden_layers"], size["llm"]["hidden_size"]) == (8, 512)


def test_real_size_wiring_builds_on_meta():
    size = bench.load_size("real")
    ours = bench.build_ours(size, "meta")
    baseline = bench.build_baseline(size, "meta")
    assert ours.visual_encoder.embed_dim == baseline.visual_encoder.embed_dim == 1408
    assert ours.llm_model.config.hidden_size == baseline.opt_model.config.hidden_size == 2048
    assert ours.llm_model.dtype == torch.bfloat16 and baseline.opt_model.dtype == torch.float16


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    """One whole bench at tiny size, every section and every toggle (a fixed matmul peak): its JSON, its
    printed report and its output directory.  The specs below read the one run."""
    out_dir = tmp_path_factory.mktemp("bench")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(
            bench, "peak_matmul_flops", lambda device, by_kernel=None: {"fp32": 1e11, "bf16": 1e12, "fp16": 1e12}
        )
        assert bench.main(["--size", "tiny", "--repeats", "1", "--out-dir", str(out_dir)]) == 0
    [out] = out_dir.glob("tiny-cpu-*.json")
    return json.loads(out.read_text()), printed.getvalue(), out_dir


def test_bench_runs_end_to_end_at_tiny_size_and_writes_its_json(tiny_bench):
    result, printed, out_dir = tiny_bench
    assert {"machine", "peak_matmul_flops", "rows", "targets", "size_config", "generation"} <= set(result)
    assert {"cpu", "cpu_count", "torch_threads", "torch"} <= set(result["machine"])
    rows = {(r["task"], r["variant"]): r for r in result["rows"]}
    fp32_base = "LAVIS blip2_opt, OPT fp32"
    for task in ("train_step", "caption", "vqa"):
        for variant in (fp32_base, "ours: default"):
            row = rows[(task, variant)]
            assert row["status"] == "ok", row
            assert row["median_s"] > 0 and row["flops"] > 0 and row["images_per_s"] > 0
            assert {"gflops_per_s", "pct_of_fp32_peak", "time_vs"} <= set(row)
        assert rows[(task, "ours: default")]["time_vs"][fp32_base] > 0
    # generation lengths are forced equal on both sides
    for task, tokens in (
        ("caption", result["size_config"]["caption_tokens"]),
        ("vqa", result["size_config"]["vqa_tokens"]),
    ):
        assert rows[(task, fp32_base)]["new_tokens"] == rows[(task, "ours: default")]["new_tokens"] == [tokens]
    # LAVIS as shipped (fp16 OPT, no autocast on CPU) is reported, run or not
    assert (("train_step", "LAVIS blip2_opt as shipped (OPT fp16)")) in rows
    assert "| train_step |" in printed
    # each generation row: its decode step against the roofline floor of that step on this machine
    assert result["memory_bandwidth_bytes_per_s"] > 0
    for task in ("caption", "vqa"):
        for variant in (fp32_base, "ours: default"):
            decode = rows[(task, variant)]["decode"]
            assert decode["status"] == "ok" and decode["rows"] == result["batch_size"] * bench.NUM_BEAMS
            assert decode["floor_ms"] > 0 and decode["bound"] in ("compute", "memory")
            assert decode["step_vs_floor"] == pytest.approx(decode["step_ms"] / decode["floor_ms"])
    assert set(result["targets"]["decode_step_vs_roofline_floor (target <= 3.0)"]) >= {
        "vqa: ours: default",
        f"vqa: {fp32_base}",
    }
    # the bound no kernel could beat: the default's FLOPs at the fastest matmul peak, against the baseline
    at_peak = result["targets"]
    step_bound = at_peak["default_at_matmul_peak_vs_lavis (time, lower bound)"][f"train_step: {fp32_base}"]
    step = rows[("train_step", "ours: default")]["flops"] / 1e12 / rows[("train_step", fp32_base)]["median_s"]
    assert step_bound == pytest.approx(step, abs=1e-3)
    vqa_bound = at_peak["default_at_matmul_peak_vs_lavis (throughput, upper bound)"][f"vqa: {fp32_base}"]
    vqa = rows[("vqa", fp32_base)]["median_s"] / (rows[("vqa", "ours: default")]["flops"] / 1e12)
    assert vqa_bound == pytest.approx(vqa, rel=1e-3)
    # the sweep: both models at every batch size and beam count, and the chart of it beside the JSON
    scaling = result["scaling"]
    for label in (fp32_base, "ours: default"):
        for task in ("train_step", "vqa"):
            assert [p["x"] for p in scaling["batch"][label][task]] == list(bench.SWEEP_BATCHES)
        assert [p["x"] for p in scaling["beams"][label]] == list(bench.SWEEP_BEAMS)
    [chart] = out_dir.glob("tiny-cpu-*-scaling.svg")
    svg = chart.read_text()
    assert svg.count("<polyline") == 6 and fp32_base in svg and "ours: default" in svg


def test_every_optimisation_is_measured_switched_off_and_on(tiny_bench):
    result, _, _ = tiny_bench
    rows = {(r["task"], r["variant"]): r for r in result["rows"]}
    for task, variant in [
        ("train_step", "ours: attention eager (default sdpa)"),
        ("vqa", "ours: feature cache on"),
        ("train_step", "ours: feature cache on"),
        ("train_step", "ours: lm_head_on_labels_only=False"),
        ("vqa_mixed", "ours: mixed questions, length-sorted"),
        ("vqa_mixed", "ours: mixed questions, dataset order"),
        ("train_step", "ours: llm_precision=fp32, autocast_dtype=off"),  # like for like with the fp32 baseline
        ("vqa", "ours: llm_precision=fp32, autocast_dtype=off, cpu_fp32_linear=torch"),
        ("train_step", "ours: llm_grad_checkpoint=True"),
    ]:
        assert rows[(task, variant)]["status"] == "ok", rows[(task, variant)]
    targets = result["targets"]
    cached = {"ours: feature cache on / ours: default"}
    bf16_rows = [
        ("train_step", "ours: autocast_dtype=bf16"),
        ("train_step", "ours: autocast_dtype=bf16, feature cache on"),
    ]
    if hardware.cpu_has_native_bf16():
        assert all(rows[key]["status"] == "ok" for key in bf16_rows)
        cached.add("ours: autocast_dtype=bf16, feature cache on / ours: autocast_dtype=bf16")
    else:  # emulated bf16 would take minutes a row: left out, and said so with the measured factor
        assert not any(key in rows for key in bf16_rows)
        assert any(
            note.startswith("bf16 rows: not measured") and "slower than fp32" in note for note in result["notes"]
        )
    assert set(targets["cached_step_vs_uncached (target <= 0.5)"]) == cached
    # the default is read against like for like, and every auto key's resolution is in the JSON
    assert set(targets["default_time_vs_like_for_like (target <= 1, within noise)"]) == {"train_step", "caption", "vqa"}
    assert result["machine"]["isa_class"] == hardware.cpu_isa_class()
    resolved = rows[("train_step", "ours: default")]["side_notes"]["resolved_defaults"]
    assert resolved["llm_precision"] == {"setting": "auto", "resolved": hardware.resolve_llm_precision("auto", "cpu")}
    assert resolved["cpu_fp32_linear"]["resolved"] in ("onednn", "torch", "under autocast")
    # the cached step runs no ViT: fewer FLOPs than the uncached one
    assert rows[("train_step", "ours: feature cache on")]["flops"] < rows[("train_step", "ours: default")]["flops"]


def test_a_decode_steps_cost_is_what_one_real_step_does_and_reads():
    """decode_step_cost (the roofline floor's numerator) against one real cached step of the LLM: the
    FLOP counter's count of it, the bytes of the cache it attends over, the weights of its linear layers."""
    from transformers.cache_utils import DynamicCache

    from blip2_internlm.internlm2.modeling import InternLM2ForCausalLM
    from blip2_internlm.tools.measure import count_flops

    config = bench.internlm2_config(bench.load_size("tiny"))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    llm = InternLM2ForCausalLM._from_config(config).eval()
    rows, prefix, generated = 6, 11, 4
    ids = torch.randint(0, config.vocab_size, (rows, prefix + generated))
    cache = DynamicCache(config=config)
    with torch.no_grad():
        llm(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        flops = count_flops(lambda: llm(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True))
    # without beams sharing a prefix, every row reads its own: images = rows
    cost = bench.decode_step_cost(llm, images=rows, rows=rows, prefix=prefix, generated=generated)
    assert cost["flops"] == flops
    assert cost["kv_bytes"] == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    embedding_and_norms = sum(
        p.nbytes for name, p in llm.named_parameters() if "norm" in name or "tok_embeddings" in name
    )
    assert cost["weight_bytes"] == sum(p.nbytes for p in llm.parameters()) - embedding_and_norms
    assert cost["dtype"] == "fp32"
    # beams of one image share its prefix: five beams per image read the prefix once
    shared = bench.decode_step_cost(llm, images=2, rows=10, prefix=prefix, generated=generated)
    per_token = cost["kv_bytes"] / (rows * (prefix + generated))
    assert shared["kv_bytes"] == per_token * (2 * prefix + 10 * generated)
