"""Export to plain transformers: the directory loads as Blip2ForConditionalGeneration + Blip2Processor in a
fresh interpreter that imports neither this package nor LAVIS, and gives our logits and our captions.

Both LLMs: the tiny blip2_internlm (InternLM2 -> LlamaForCausalLM, exported with the command line from a
checkpoint) and the tiny OPT baseline (exported in memory).  The LLMs are the pretrained tiny assets; a
seeded random Q-Former gives the same caption for every image, so the bridge is fitted first (below).

The instruction model loads as InstructBlipForConditionalGeneration + InstructBlipProcessor and answers a
conversation as ours does, its LoRA adapters merged into the exported LLM (the last section).
"""

import json
import textwrap

import pytest
import torch
from PIL import Image, ImageDraw
from spec_helpers import REPO, run_python

# transformers' Blip2 against our model: other kernels (SDPA, split q/k/v) on both sides of each comparison
pytestmark = pytest.mark.kernel_sensitive

PROMPT = "图片描述："
SCENES = [("red", "circle", "left"), ("blue", "square", "right"), ("green", "circle", "center")]
RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40)}
TEXT = "左边有一个红色的圆形"
MAX_NEW, BEAMS = 10, 3
#: fp32 on both sides, largest logit about 14.  With our ln_vision given the export's eps, what is left
#: is summation order (SDPA kernels, split q/k/v), amplified by the fitted bridge: measured 2e-5.
LOGITS_ATOL = 1e-4
#: With ln_vision's own eps (1e-5; Blip2VisionConfig has one layer_norm_eps, the EVA blocks' 1e-6): the
#: tiny ViT's last residual stream has a variance near 1e-3, so the eps is felt: measured 1.4e-3.
LOGITS_ATOL_LN_VISION_EPS = 5e-3


def scene_image(color, shape, position, size=80):
    """A shapes-style picture; 80 px, so both processors resize it to the ViT's 64."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    cx, cy, r = {"left": 0.2, "center": 0.5, "right": 0.8}[position] * size, size / 2, 0.18 * size
    box = (cx - r, cy - r, cx + r, cy + r)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=RGB[color])
    return image


def fit_bridge(model, pixels, queries=None):
    """Set ``llm_proj`` by ridge regression so each image's soft prompt approximates the keyword context the
    tiny LLM was pretrained to read ("zh red circle left", repeated over the queries): a one-step stand-in for
    stage 2, so the captions depend on the image and the comparison below can tell images apart.
    ``queries``: the Q-Former's output for ``pixels`` (default: its query path's, as BLIP-2 runs it)."""
    with torch.no_grad():
        if queries is None:
            queries = model.Qformer.bert(
                query_embeds=model.query_tokens.expand(len(pixels), -1, -1),
                encoder_hidden_states=model.image_embeds({"image": pixels}),
                return_dict=True,
            ).last_hidden_state  # (B, n_query, qformer_width)
        n_query = queries.shape[1]
        embed = model.llm_model.get_input_embeddings()
        targets = []
        for scene in SCENES:
            ids = model.llm_tokenizer(" ".join(("zh", *scene)), add_special_tokens=False).input_ids
            targets.append(embed(torch.tensor((ids * n_query)[:n_query])))
        inputs = torch.cat([queries, torch.ones(*queries.shape[:2], 1)], -1).flatten(0, 1).double()
        targets = torch.stack(targets).flatten(0, 1).double()
        solution = torch.linalg.solve(
            inputs.T @ inputs + 1e-3 * torch.eye(inputs.shape[1], dtype=torch.double), inputs.T @ targets
        )  # (qformer_width + 1, llm_width)
        model.llm_proj.weight.copy_(solution[:-1].T.float())
        model.llm_proj.bias.copy_(solution[-1].float())


# Runs in a fresh interpreter: transformers only, no trust_remote_code.
HF_SIDE = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    images_dir, prompt, text, max_new, beams, out_json, *exports = sys.argv[1:]
    max_new, beams = int(max_new), int(beams)
    images = [Image.open(f"{images_dir}/{i}.png").convert("RGB") for i in range(3)]
    results = {}
    for export in exports:
        model, info = Blip2ForConditionalGeneration.from_pretrained(export, output_loading_info=True)
        model.eval()
        processor = AutoProcessor.from_pretrained(export)
        tokenizer = processor.tokenizer
        slow_tokenizer = AutoProcessor.from_pretrained(export, use_fast=False).tokenizer

        def captions(inputs, **kwargs):
            new = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
            return [caption.strip() for caption in processor.batch_decode(new, skip_special_tokens=True)]

        scored = processor(images=images, text=[prompt + text] * 3, return_tensors="pt")
        prompted = processor(images=images, text=[prompt] * 3, return_tensors="pt")
        padded = processor(images=images[:2], text=[prompt, "A short caption:"], padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**scored).logits
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                 [{"role": "user", "content": prompt}]]  # OpenAI-style parts, and a plain string
        save_file({"logits": logits.contiguous(), "pixel_values": scored["pixel_values"].contiguous()},
                  f"{export}.tensors.safetensors")
        results[export] = {
            "loading_info": {key: sorted(value) for key, value in info.items() if key != "mismatched_keys"},
            "processor": [type(processor).__name__, type(tokenizer).__name__, type(processor.image_processor).__name__],
            "input_ids": scored["input_ids"].tolist(),
            "slow_ids": [type(slow_tokenizer).__name__, slow_tokenizer(prompt + text).input_ids],
            "image_token_id": model.config.image_token_id,
            # generation_config.json, and what Blip2's generate() really uses: the language model's
            "eos_token_id": [model.generation_config.eos_token_id, model.language_model.generation_config.eos_token_id],
            "greedy": captions(prompted, num_beams=1, max_new_tokens=max_new, min_new_tokens=1),
            "beam": captions(prompted, num_beams=beams, max_new_tokens=max_new, min_new_tokens=1),
            "defaults": captions(prompted),
            "padded": captions(padded, num_beams=1, max_new_tokens=max_new, min_new_tokens=1),
            "chat": [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats],
            "bos_token": tokenizer.bos_token,
        }
    results["modules"] = sorted({name.split(".")[0] for name in sys.modules} & {"blip2_internlm", "lavis"})
    with open(out_json, "w") as f:
        json.dump(results, f, ensure_ascii=False)
    """
)


def our_outputs(model, vis_processor, images):
    """What our model gives for the inputs HF_SIDE feeds the export."""
    tok = model.llm_tokenizer
    pixels = torch.stack([vis_processor(image) for image in images])
    ids = torch.tensor([tok.bos_token_id] + tok(PROMPT + TEXT, add_special_tokens=False).input_ids)
    with torch.no_grad():
        queries = model.query_embeds(pixels)  # (B, n_query, llm_width)
        embeds = torch.cat([queries, model.llm_model.get_input_embeddings()(ids).expand(len(images), -1, -1)], 1)
        logits = model.llm_model(inputs_embeds=embeds).logits

    def captions(prompt, **kwargs):
        batch = pixels[: len(prompt)] if isinstance(prompt, list) else pixels
        return model.generate({"image": batch, "prompt": prompt}, **kwargs)

    with torch.no_grad():  # again with the export's eps in ln_vision (see LOGITS_ATOL_LN_VISION_EPS)
        eps, model.ln_vision.eps = model.ln_vision.eps, model.visual_encoder.blocks[0].norm1.eps
        embeds[:, : queries.shape[1]] = model.query_embeds(pixels)
        model.ln_vision.eps = eps
        logits_export_eps = model.llm_model(inputs_embeds=embeds).logits
    return {
        "pixel_values": pixels,
        "ids": ids.tolist(),
        "n_query": queries.shape[1],
        "logits": logits,
        "logits_export_eps": logits_export_eps,
        "greedy": captions(PROMPT, num_beams=1, max_length=MAX_NEW, min_length=1),
        "beam": captions(PROMPT, num_beams=BEAMS, max_length=MAX_NEW, min_length=1),
        "defaults": captions(PROMPT),
        "padded": captions([PROMPT, "A short caption:"], num_beams=1, max_length=MAX_NEW, min_length=1),
    }


@pytest.fixture(scope="module")
def exported(lavis_ready, tmp_path_factory):
    """Both tiny models, ours computed here, their exports run in one fresh interpreter: {arch: (ours, theirs)}."""
    from lavis.models import load_model_and_preprocess
    from safetensors.torch import load_file

    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.models.blip2_internlm import stop_token_ids
    from blip2_internlm.tools.export import export_to_hf

    tmp = tmp_path_factory.mktemp("export")
    for i, scene in enumerate(SCENES):
        scene_image(*scene).save(tmp / f"{i}.png")
    images = [Image.open(tmp / f"{i}.png").convert("RGB") for i in range(len(SCENES))]
    ours, exports = {}, {}
    for arch in ("blip2_internlm", "blip2_opt_baseline"):
        torch.manual_seed(0)
        model, vis_processors, _ = load_model_and_preprocess(arch, "tiny", is_eval=True)
        fit_bridge(model, torch.stack([vis_processors["eval"](image) for image in images]))
        ours[arch] = our_outputs(model, vis_processors["eval"], images)
        ours[arch]["stop_token_ids"] = stop_token_ids(model.llm_tokenizer)
        ours[arch]["vocab"] = model.llm_model.get_input_embeddings().num_embeddings
        exports[arch] = tmp / arch
        if arch == "blip2_internlm":  # the command line, from a stage-2-style checkpoint (the trained parts)
            frozen = ("visual_encoder.", "llm_model.")
            trained = {k: v for k, v in model.state_dict().items() if not k.startswith(frozen)}
            checkpoint = save_checkpoint_file({"model": trained}, tmp / "stage2.pth")
            result = run_python(
                "-m",
                "blip2_internlm.tools.export",
                "--to-hf",
                str(exports[arch]),
                "--model-type",
                "tiny",
                "--checkpoint",
                str(checkpoint),
                timeout=300,
            )
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        else:
            export_to_hf(model, exports[arch])
    out_json = tmp / "hf_side.json"
    result = run_python(
        "-c",
        HF_SIDE,
        str(tmp),
        PROMPT,
        TEXT,
        str(MAX_NEW),
        str(BEAMS),
        str(out_json),
        *(str(path) for path in exports.values()),
        env={"HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    theirs = json.loads(out_json.read_text(encoding="utf-8"))
    assert theirs.pop("modules") == []
    for arch, path in exports.items():
        theirs[arch] = theirs.pop(str(path)) | load_file(f"{path}.tensors.safetensors")
    return {arch: (ours[arch], theirs[arch]) for arch in ours}


ARCHS = ["blip2_internlm", "blip2_opt_baseline"]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_loads_with_plain_transformers_and_every_weight_comes_from_the_file(exported, arch):
    _, theirs = exported[arch]
    assert theirs["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "error_msgs": []}
    tokenizer = {"blip2_internlm": "LlamaTokenizerFast", "blip2_opt_baseline": "GPT2TokenizerFast"}[arch]
    assert theirs["processor"] == ["Blip2Processor", tokenizer, "BlipImageProcessor"]


@pytest.mark.parametrize("arch", ARCHS)
def test_processor_gives_our_pixels_and_our_llm_input(exported, arch):
    ours, theirs = exported[arch]
    # BlipImageProcessor resizes with PIL's bicubic as LAVIS's blip_image_eval does
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"], atol=1e-6, rtol=0)
    image_token = theirs["image_token_id"]
    assert image_token not in ours["ids"]
    # [queries] <s> prompt text: one <image> per query, then our tokenizer's ids
    for row in theirs["input_ids"]:
        assert row == [image_token] * ours["n_query"] + ours["ids"]
    slow = {"blip2_internlm": "LlamaTokenizer", "blip2_opt_baseline": "GPT2Tokenizer"}[arch]
    assert theirs["slow_ids"] == [slow, ours["ids"]]  # use_fast=False too


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_ours_in_fp32(exported, arch):
    ours, theirs = exported[arch]
    vocab = ours["logits"].shape[-1]  # the export's extra last column is <image>'s
    assert theirs["logits"].shape[:-1] == ours["logits"].shape[:-1]
    logits = theirs["logits"][..., :vocab]
    torch.testing.assert_close(logits, ours["logits_export_eps"], atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(logits, ours["logits"], atol=LOGITS_ATOL_LN_VISION_EPS, rtol=0)
    # the images move the logits far more than either tolerance: the comparison sees them
    assert (ours["logits"][0] - ours["logits"][1]).abs().max() > 100 * LOGITS_ATOL_LN_VISION_EPS


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_and_beam_captions_are_ours(exported, arch):
    ours, theirs = exported[arch]
    # our captions run ln_vision with its own eps, logits up to ~1.4e-3 from the export's (measured,
    # LOGITS_ATOL_LN_VISION_EPS): equal captions need every decision's gap above that, on any CPU
    assert theirs["greedy"] == ours["greedy"]
    assert theirs["beam"] == ours["beam"]
    assert len(set(ours["greedy"])) > 1 and len(set(ours["beam"])) > 1  # not one caption for every image


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_config_stops_where_ours_stops_with_our_defaults(exported, arch):
    ours, theirs = exported[arch]
    assert theirs["eos_token_id"] == [ours["stop_token_ids"]] * 2  # end of text and the newline token
    assert theirs["defaults"] == ours["defaults"]  # generate() with no arguments: 5 beams, 30 new tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_of_different_prompts_gives_our_captions(exported, arch):
    ours, theirs = exported[arch]
    assert theirs["padded"] == ours["padded"]


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_renders_the_prompt_after_the_start_token(exported, arch):
    _, theirs = exported[arch]
    assert theirs["chat"] == [theirs["bos_token"] + PROMPT] * 2


# --- refusals ---------------------------------------------------------------------------------------------


def test_vit_options_without_a_blip2_counterpart_are_named(lavis_ready):
    from functools import partial

    from lavis.models.eva_vit import VisionTransformer
    from torch import nn

    from blip2_internlm.tools.export import ExportError, vision_config_and_weights

    vit = VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=4,
        qkv_bias=True,
        use_mean_pooling=False,
        init_values=0.1,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    with pytest.raises(ExportError, match=r"block 0: layer scale \(init_values\)"):
        vision_config_and_weights(vit, nn.LayerNorm(32))


def test_export_refuses_a_non_empty_directory_and_a_foreign_llm(lavis_ready, tmp_path):
    from types import SimpleNamespace

    from torch import nn

    from blip2_internlm.tools.export import ExportError, export_to_hf, plain_language_model

    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        export_to_hf(SimpleNamespace(), tmp_path)
    with pytest.raises(ExportError, match="plain transformers cannot load"):
        plain_language_model(nn.Linear(2, 2))


def test_a_config_path_gives_the_decoding_of_its_evaluation(lavis_ready):
    # the model and processors of --cfg-path and --options: blip2_internlm.factory (tests/test_factory.py)
    from blip2_internlm.tools.export import run_decoding

    cfg_path = REPO / "configs/tiny/caption_eval.yaml"
    # the export decodes as the evaluation did: run.num_beams 3, max_len 30, and min_len from the options
    assert run_decoding(cfg_path, ["run.min_len=2"]) == {"num_beams": 3, "max_new_tokens": 30, "min_new_tokens": 2}
    assert run_decoding(None, []) == {}


def test_the_command_line_builds_a_config_paths_model_with_a_whole_runs_options(
    tiny_trained_checkpoint, tmp_path, capsys
):
    from blip2_internlm.tools.export import main

    _, checkpoint, _ = tiny_trained_checkpoint
    source = ["--cfg-path", str(REPO / "configs/tiny/caption_eval.yaml"), "--checkpoint", str(checkpoint)]
    out = tmp_path / "hf"
    assert main(["--to-hf", str(out), *source, "--options", "model.max_txt_len=16", "run.min_len=2"]) == 0
    assert json.loads((out / "generation_config.json").read_text())["min_new_tokens"] == 2
    # a model option the config does not have is refused before anything is written
    assert main(["--to-hf", str(tmp_path / "not_written"), *source, "--options", "model.max_txt_lenn=16"]) == 1
    assert "did you mean 'max_txt_len'" in capsys.readouterr().err
    assert not (tmp_path / "not_written").exists()


def test_a_stage1_checkpoint_is_refused_naming_the_weights_it_lacks(lavis_ready, tmp_path, capsys):
    """A stage-1 checkpoint has no llm_proj: exported, the model would project with random weights."""
    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.factory import build_model
    from blip2_internlm.tools.export import main

    stage1 = build_model("blip2", "tiny")
    trainable = {k: v for k, v in stage1.state_dict().items() if k.startswith(("Qformer.", "query_tokens"))}
    checkpoint = save_checkpoint_file({"model": trainable}, tmp_path / "stage1.pth")
    out = tmp_path / "hf"
    assert main(["--to-hf", str(out), "--model-type", "tiny", "--checkpoint", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "does not initialise" in err and "llm_proj" in err and not out.exists()


# --- blip2_internlm_instruct -> InstructBlipForConditionalGeneration -------------------------------------

HISTORY = [
    {"role": "user", "content": "图里有圆形吗？"},
    {"role": "assistant", "content": "是"},
    {"role": "user", "content": "它是什么颜色？"},
]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
#: the plain export's default system message: quotes, a backslash, a newline, jinja syntax, a non-BMP character
SYSTEM_PROMPT = 'Say "hi"\\ {{ x }} {% raw %}你好 😀\n'
#: longer than the tiny model's max_instruction_len (64 Q-Former tokens): the Q-Former keeps the latest ones
LONG_INSTRUCTION = "\n".join(f"question {i}: is the circle red or blue?" for i in range(12))
CHAT_MAX_NEW = 12
#: the two exports: LoRA on InternLM2-chat's turns (through the command line, from a checkpoint), and the
#: plain template with a system prompt (no adapters, in memory)
INSTRUCT_OPTIONS = {"lora": {"llm_lora": LORA}, "plain": {"chat_template": "plain", "system_prompt": SYSTEM_PROMPT}}

# Runs in a fresh interpreter: transformers only, no trust_remote_code.
INSTRUCT_HF_SIDE = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoProcessor, InstructBlipForConditionalGeneration

    images_dir, history, long_instruction, max_new, out_json, *exports = sys.argv[1:]
    history, max_new = json.loads(history), int(max_new)
    images = [Image.open(f"{images_dir}/{i}.png").convert("RGB") for i in range(3)]
    results = {}
    for export in exports:
        model, info = InstructBlipForConditionalGeneration.from_pretrained(export, output_loading_info=True)
        model.eval()
        processor = AutoProcessor.from_pretrained(export)
        tokenizer = processor.tokenizer
        # the LLM reads the rendered history; the Q-Former the user turns (docs/export.md)
        rendered = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        instruction = "\\n".join(m["content"] for m in history if m["role"] == "user")
        inputs = processor(images=images, text=[rendered] * 3, add_special_tokens=False, return_tensors="pt")
        qformer = processor.qformer_tokenizer([instruction] * 3, truncation=True, padding=True, return_tensors="pt")
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = qformer.input_ids, qformer.attention_mask
        with torch.no_grad():
            new = model.generate(**inputs, max_new_tokens=max_new)[:, inputs["input_ids"].shape[1]:]
        with_system = [{"role": "system", "content": "看图回答。"}, *history]
        results[export] = {
            "loading_info": {key: sorted(value) for key, value in info.items() if key != "mismatched_keys"},
            "processor": [type(processor).__name__, type(tokenizer).__name__,
                          type(processor.qformer_tokenizer).__name__, type(processor.image_processor).__name__],
            "input_ids": inputs["input_ids"].tolist(),
            "qformer_ids": qformer.input_ids.tolist(),
            "long_instruction_ids": processor.qformer_tokenizer(long_instruction, truncation=True).input_ids,
            "image_token_id": model.config.image_token_id,
            "eos_token_id": [model.generation_config.eos_token_id, model.language_model.generation_config.eos_token_id],
            "answers": [answer.strip() for answer in processor.batch_decode(new, skip_special_tokens=True)],
            "chat": [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                     for chat in (history, with_system)],
        }
    results["modules"] = sorted({name.split(".")[0] for name in sys.modules} & {"blip2_internlm", "lavis"})
    with open(out_json, "w") as f:
        json.dump(results, f, ensure_ascii=False)
    """
)


def instruction_queries(model, pixels, instruction):
    """The instruction-aware Q-Former's output for ``pixels`` (what ``llm_proj`` reads), (B, n_query, width)."""
    seen = []
    hook = model.llm_proj.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    try:
        with torch.no_grad():
            model.query_embeds(pixels, instructions=[instruction] * len(pixels))
    finally:
        hook.remove()
    return seen[0]


def build_instruct(**options):
    """The tiny instruction model with every trainable weight (LoRA's A and B, B zero when built) moved by seeded
    noise, and the bridge fitted to the history's instruction."""
    from blip2_internlm.factory import build_model

    torch.manual_seed(0)
    model = build_model("blip2_internlm_instruct", "tiny", options=options, is_eval=True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def conversation(model, messages):
    """``messages`` as ``model.chat`` renders them: with the model's system prompt where they have none."""
    return model.conversations({"messages": [messages]}, 1, with_answers=False)[0]


@pytest.fixture(scope="module")
def instruct_exported(lavis_ready, tmp_path_factory):
    """Both instruction exports, ours computed here, theirs in one fresh interpreter: {name: (ours, theirs)}."""
    from lavis.processors import load_processor

    from blip2_internlm.checkpoint import save_checkpoint_file
    from blip2_internlm.models.chat_template import user_turns
    from blip2_internlm.models.llm_inputs import segment_ids
    from blip2_internlm.models.lora import lora_layers
    from blip2_internlm.tools.export import export_to_hf, main

    tmp = tmp_path_factory.mktemp("instruct_export")
    for i, scene in enumerate(SCENES):
        scene_image(*scene).save(tmp / f"{i}.png")
    vis_processor = load_processor("blip_image_eval", {"image_size": 64})
    pixels = torch.stack([vis_processor(Image.open(tmp / f"{i}.png").convert("RGB")) for i in range(len(SCENES))])
    instruction = user_turns(HISTORY)
    ours, exports = {}, {}
    for name, options in INSTRUCT_OPTIONS.items():
        model = build_instruct(**options)
        fit_bridge(model, pixels, instruction_queries(model, pixels, instruction))
        state_before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
        adapters_before = len(lora_layers(model.llm_model))
        exports[name] = tmp / name
        if name == "lora":  # the command line, from a checkpoint of every trainable weight (the adapters too)
            trained = {key: model.state_dict()[key] for key, param in model.named_parameters() if param.requires_grad}
            checkpoint = save_checkpoint_file({"model": trained}, tmp / "instruct.pth")
            lora = "{" + ", ".join(f"{key}: {value}" for key, value in LORA.items()) + "}"
            argv = ["--to-hf", str(exports[name]), "--arch", "blip2_internlm_instruct", "--model-type", "tiny"]
            assert main([*argv, "--checkpoint", str(checkpoint), "--options", f"model.llm_lora={lora}"]) == 0
        else:
            export_to_hf(model, exports[name])
        tokenizer = model.llm_tokenizer
        ours[name] = {
            "model": model,
            "state_before": state_before,
            "adapters_before": adapters_before,
            "answers": [model.chat(image, HISTORY, max_length=CHAT_MAX_NEW) for image in pixels],
            "ids": segment_ids(tokenizer, [model.template.generation_segments(conversation(model, HISTORY))])[0][0],
            "qformer_ids": model.tokenizer(instruction).input_ids,
            "long_instruction_ids": model.tokenizer(
                LONG_INSTRUCTION, truncation=True, max_length=model.model_config.max_instruction_len
            ).input_ids,
            "n_query": model.query_tokens.shape[1],
            "stop_token_ids": model.stop_token_ids,
            "chat": [
                model.template.render(conversation(model, chat), True, tokenizer)
                for chat in (HISTORY, [{"role": "system", "content": "看图回答。"}, *HISTORY])
            ],
        }
    out_json = tmp / "hf_side.json"
    result = run_python(
        "-c",
        INSTRUCT_HF_SIDE,
        str(tmp),
        json.dumps(HISTORY, ensure_ascii=False),
        LONG_INSTRUCTION,
        str(CHAT_MAX_NEW),
        str(out_json),
        *(str(path) for path in exports.values()),
        env={"HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    theirs = json.loads(out_json.read_text(encoding="utf-8"))
    assert theirs.pop("modules") == []
    return {name: (ours[name] | {"export": path}, theirs[str(path)]) for name, path in exports.items()}


INSTRUCT_EXPORTS = list(INSTRUCT_OPTIONS)


@pytest.mark.parametrize("name", INSTRUCT_EXPORTS)
def test_instruct_export_loads_as_instructblip_with_every_weight_from_the_file(instruct_exported, name):
    _, theirs = instruct_exported[name]
    assert theirs["loading_info"] == {"missing_keys": [], "unexpected_keys": [], "error_msgs": []}
    assert theirs["processor"] == [
        "InstructBlipProcessor",
        "LlamaTokenizerFast",
        "BertTokenizerFast",
        "BlipImageProcessor",
    ]


@pytest.mark.parametrize("name", INSTRUCT_EXPORTS)
def test_instruct_chat_template_renders_our_conversation(instruct_exported, name):
    ours, theirs = instruct_exported[name]
    # with the model's system prompt where the history has none (plain: jinja-hostile text survives), and without
    assert theirs["chat"] == ours["chat"]


@pytest.mark.parametrize("name", INSTRUCT_EXPORTS)
def test_instruct_processor_gives_our_llm_input_and_our_qformer_instruction(instruct_exported, name):
    ours, theirs = instruct_exported[name]
    # [queries] <s> rendered history: one <image> per query, then the ids our template's segments give
    for row in theirs["input_ids"]:
        assert row == [theirs["image_token_id"]] * ours["n_query"] + ours["ids"]
    assert theirs["qformer_ids"] == [ours["qformer_ids"]] * 3
    # truncated as ours: max_instruction_len tokens, the latest kept
    assert theirs["long_instruction_ids"] == ours["long_instruction_ids"]
    assert len(ours["long_instruction_ids"]) == 64


@pytest.mark.parametrize("name", INSTRUCT_EXPORTS)
def test_instruct_export_answers_a_history_as_our_chat_does(instruct_exported, name):
    ours, theirs = instruct_exported[name]
    assert theirs["eos_token_id"] == [ours["stop_token_ids"]] * 2  # <|im_end|> and </s>, or </s>
    assert theirs["answers"] == ours["answers"]
    assert len(set(ours["answers"])) > 1  # the image reaches the answer


def test_instruct_export_has_the_merged_adapters_and_leaves_ours_unmerged(instruct_exported):
    import copy

    from safetensors.torch import load_file

    from blip2_internlm.internlm2.convert import internlm2_to_llama
    from blip2_internlm.models.lora import lora_layers, merge_lora

    ours, _ = instruct_exported["lora"]
    model = ours["model"]
    exported = load_file(ours["export"] / "model.safetensors")
    with torch.no_grad():
        merged, base = copy.deepcopy(model.llm_model), copy.deepcopy(model.llm_model)
        merge_lora(merged)
        for name, param in base.named_parameters():
            if ".lora_B." in name:
                param.zero_()  # merged, a zero B leaves the base weight
        merge_lora(base)
    merged, base = internlm2_to_llama(merged).state_dict(), internlm2_to_llama(base).state_dict()
    for key, tensor in merged.items():
        theirs = exported["language_model." + key]
        assert torch.equal(theirs[: tensor.shape[0]], tensor), key  # beyond: the <image> row
    changed = {key for key in merged if not torch.equal(merged[key], base[key])}
    adapted = {key for key in merged if key.endswith(("_proj.weight",))}  # wqkv (q, k, v), wo, w1, w2, w3
    assert changed == adapted and len(adapted) == 7 * model.llm_model.config.num_hidden_layers
    # ours keeps its adapters, unmerged, and every weight as before the export
    assert len(lora_layers(model.llm_model)) == ours["adapters_before"] > 0
    assert not any(layer.merged for layer in lora_layers(model.llm_model))
    after = model.state_dict()
    assert after.keys() == ours["state_before"].keys()
    assert all(torch.equal(after[key], tensor) for key, tensor in ours["state_before"].items())


def test_instruct_export_refuses_what_instructblip_cannot_hold(instruct_exported, tmp_path, monkeypatch):
    import dataclasses

    from blip2_internlm.tools.export import ExportError, export_to_hf

    ours, _ = instruct_exported["lora"]
    model = ours["model"]
    no_instruction = dataclasses.replace(model.model_config, qformer_text_input=False)
    monkeypatch.setattr(model, "model_config", no_instruction)
    with pytest.raises(ExportError, match="qformer_text_input is false: this Q-Former reads no instruction"):
        export_to_hf(model, tmp_path / "no_instruction")
    monkeypatch.undo()
    # QLoRA's base: bitsandbytes 4-bit weights (a CUDA build; here its config's mark is enough)
    monkeypatch.setattr(model.llm_model.config, "quantization_config", {"quant_method": "bitsandbytes"}, raising=False)
    with pytest.raises(ExportError, match=r"quantised \(bitsandbytes.*build the model with load_in_4bit: false"):
        export_to_hf(model, tmp_path / "four_bit")
    assert not (tmp_path / "no_instruction").exists() and not (tmp_path / "four_bit").exists()
