"""Throughput and memory benchmark of the native InternLM2 (CPU; a script, not a test).

    python -m blip2_internlm.tools.bench_internlm2 [--skip-1_8b] [--out output/bench/internlm2.json]

* generate() tokens/s with the KV cache off/on, eager vs sdpa, for the tiny model and a
  ~100M-parameter config (random weights, fp32, greedy, batch 1);
* unless ``--skip-1_8b`` (3.8 GB of temporary disk; docs/internlm2.md has the times): writes a random
  bf16 checkpoint of the internlm2-1_8b shape (~3.8 GB, sharded safetensors) to a temp dir and loads
  it in a fresh subprocess with ``low_cpu_mem_usage=True``, reporting peak RSS against the size of
  the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from blip2_internlm.internlm2.configuration import InternLM2Config
from blip2_internlm.internlm2.modeling import InternLM2ForCausalLM
from blip2_internlm.tiny.internlm2 import TINY_CONFIG

CONFIG_100M = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    bias=False,
)


def _generate_rate(model, prompt_len: int, new_tokens: int, use_cache: bool, repeats: int) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=2,
        eos_token_id=None,
    )
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(ids, **kwargs)
            best = min(best, time.perf_counter() - start)
    return new_tokens / best


def bench_generate(name: str, config_values: dict, prompt_len: int, new_tokens: int, repeats: int) -> list[dict]:
    rows = []
    for impl in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = InternLM2ForCausalLM(InternLM2Config(attn_implementation=impl, **config_values)).eval()
        params = model.num_parameters()
        for use_cache in (False, True):
            rate = _generate_rate(model, prompt_len, new_tokens, use_cache, repeats)
            rows.append(
                dict(
                    model=name,
                    params=params,
                    attn=impl,
                    use_cache=use_cache,
                    prompt_len=prompt_len,
                    new_tokens=new_tokens,
                    tokens_per_s=round(rate, 2),
                )
            )
            print(
                f"  {name:5s} {params / 1e6:7.1f}M  {impl:5s}  cache={str(use_cache):5s}  {rate:9.1f} tok/s", flush=True
            )
    return rows


def write_random_checkpoint(
    out_dir: Path, config: InternLM2Config, dtype=torch.bfloat16, shard_bytes: int = 2 * 1024**3
) -> int:
    """Random weights of ``config``'s shape as sharded safetensors, one tensor at a time."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {n: t.shape for n, t in InternLM2ForCausalLM(config).state_dict().items()}
    config.dtype = dtype
    config.save_pretrained(out_dir)
    shards, current, size, total = [], {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        tensor = torch.empty(shape, dtype=dtype)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        current[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            shards.append(current)
            total += size
            current, size = {}, 0
    if current:
        shards.append(current)
        total += size
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out_dir / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
        shard.clear()
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return total


_LOAD_PROBE = r"""
import json, sys, time
import torch
import transformers
from blip2_internlm.internlm2 import InternLM2ForCausalLM

def status(key):  # VmHWM resets at exec, unlike ru_maxrss which a forked child inherits
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

base = status("VmHWM")
start = time.perf_counter()
model = InternLM2ForCausalLM.from_pretrained(sys.argv[1], low_cpu_mem_usage=True, torch_dtype=torch.bfloat16)
seconds = time.perf_counter() - start
after_load = status("VmHWM")
start = time.perf_counter()
with torch.inference_mode():
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
forward_s = time.perf_counter() - start
print(json.dumps({"rss_after_imports": base, "peak_rss_load": after_load, "peak_rss_forward": status("VmHWM"),
                  "load_s": seconds, "forward_s": forward_s, "params": model.num_parameters(),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                  "finite": bool(torch.isfinite(logits).all())}))
"""


def bench_load_1_8b(workdir: str | None) -> dict:
    config = InternLM2Config.preset("internlm2-1_8b")
    with tempfile.TemporaryDirectory(dir=workdir, prefix="internlm2-1_8b-") as tmp:
        start = time.perf_counter()
        weights = write_random_checkpoint(Path(tmp), config)
        write_s = time.perf_counter() - start
        print(f"  wrote {weights / 1e9:.2f} GB of bf16 weights in {write_s:.0f} s", flush=True)
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(
            [sys.executable, "-c", _LOAD_PROBE, tmp], capture_output=True, text=True, env=env, check=True
        )
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    base = probe["rss_after_imports"]
    result = dict(
        weights_bytes=weights,
        write_s=round(write_s, 1),
        load_s=round(probe["load_s"], 2),
        first_forward_s=round(probe["forward_s"], 2),
        rss_after_imports_bytes=base,
        peak_rss_after_load_bytes=probe["peak_rss_load"],
        peak_rss_after_forward_bytes=probe["peak_rss_forward"],
        load_growth_over_weights=round((probe["peak_rss_load"] - base) / weights, 3),
        forward_growth_over_weights=round((probe["peak_rss_forward"] - base) / weights, 3),
        params=probe["params"],
        param_dtypes=probe["dtypes"],
        logits_finite=probe["finite"],
    )
    gb = 1e9
    print(
        f"  from_pretrained {result['load_s']} s, first forward {result['first_forward_s']} s; peak RSS: "
        f"imports {base / gb:.2f} GB, after load {probe['peak_rss_load'] / gb:.2f} GB, after a forward "
        f"{probe['peak_rss_forward'] / gb:.2f} GB, for {weights / gb:.2f} GB of weights",
        flush=True,
    )
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m blip2_internlm.tools.bench_internlm2", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--skip-1_8b", action="store_true", help="skip writing/loading the 1.8B-shaped bf16 checkpoint")
    parser.add_argument("--workdir", default=None, help="where to write the temporary 1.8B checkpoint")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="best of N timed runs (the machine may be shared)")
    parser.add_argument("--out", type=Path, default=Path("output/bench/internlm2.json"))
    args = parser.parse_args(argv)

    machine = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
    )
    print(f"machine: {machine}", flush=True)
    tiny = {k: v for k, v in TINY_CONFIG.items()}
    tiny["vocab_size"] = 800
    results = dict(machine=machine, load_average_before=os.getloadavg(), generate=[])
    print("generate (greedy, batch 1, fp32):", flush=True)
    results["generate"] += bench_generate("tiny", tiny, args.prompt_len, args.new_tokens, args.repeats)
    results["generate"] += bench_generate("100M", CONFIG_100M, args.prompt_len, args.new_tokens, args.repeats)
    if not args.skip_1_8b:
        print("load internlm2-1_8b-shaped bf16 checkpoint (low_cpu_mem_usage):", flush=True)
        results["load_1_8b"] = bench_load_1_8b(args.workdir)

    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| model | params | attn | use_cache | tokens/s |\n|---|---|---|---|---|")
    for row in results["generate"]:
        print(
            f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['attn']} | {row['use_cache']} | "
            f"{row['tokens_per_s']} |"
        )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
