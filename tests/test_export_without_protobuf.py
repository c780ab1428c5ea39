"""The exported directory loads with what ``pip install torch transformers pillow`` installs: no protobuf, no
sentencepiece, neither this package nor LAVIS; ``use_fast=False`` needs sentencepiece and still no protobuf.

The environment is a real virtualenv whose site-packages holds links to exactly the installed distributions
that those three pull in (their requirements, followed through the installed metadata); protobuf is not among
them.  Before the fast tokenizer was saved with ``add_prefix_space`` null, ``LlamaTokenizerFast`` rebuilt itself
from ``tokenizer.model`` with transformers' converter and loading failed there with "LlamaConverter requires
the protobuf library".

The exported tokenizers encode and decode as the model's own: ``InternLM2Tokenizer`` and the Q-Former's BERT
tokenizer, on Chinese and English text with special tokens, and the chat template's ids.
"""

import json
import os
import subprocess
import sys
import textwrap
import venv
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

#: what docs/export.md tells a user of the exported directory to install
PLAIN_INSTALL = ("torch", "transformers", "pillow")
PROMPT = "图片描述："
PROBES = [
    "图片描述：一个红色的圆形在左边",
    "Question: what colour is the square? Short answer:",
    "问题：图里有几个圆形？ 简短回答：两个",
    " a leading space, then 中文 mixed with English",
    "line one\nline two\n\n第三行 ",
    "<|im_start|>user\n图里有什么？<|im_end|>\n<|im_start|>assistant\n",
    "a</s>b<s>c <|im_end|>",
    "数字 0123456789 and tabs\t\tend",
    "emoji 😀, full-width ０１２, café",
    "",
]
HISTORY = [
    {"role": "user", "content": "图里有圆形吗？"},
    {"role": "assistant", "content": "是"},
    {"role": "user", "content": "What colour is it?"},
]
MAX_NEW = 6


def _distribution_closure(names):
    """The installed distributions ``pip install *names`` would install: {name: Distribution}."""
    found, todo = {}, list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = dist = metadata.distribution(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def _link_distributions(dists, site_packages):
    """Link each distribution's top-level files and folders (its RECORD's first path parts) into ``site_packages``;
    a folder several distributions share (a namespace package) comes whole, so the spec checks what is absent."""
    for name, dist in dists.items():
        assert dist.files is not None, f"{name} has no RECORD: cannot tell its files"
        for top in {file.parts[0] for file in dist.files} - {"..", "__pycache__"}:
            link = site_packages / top
            if not link.exists():
                link.symlink_to(dist.locate_file(top))


@pytest.fixture(scope="module")
def plain_python(tmp_path_factory):
    """(python of a virtualenv with only torch, transformers and pillow, a folder with only sentencepiece)."""
    root = tmp_path_factory.mktemp("plain_env")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site_packages = root / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert site_packages.is_dir()
    closure = _distribution_closure(PLAIN_INSTALL)
    assert "protobuf" not in closure and "sentencepiece" not in closure
    _link_distributions(closure, site_packages)
    sentencepiece = root / "sentencepiece_only"
    sentencepiece.mkdir()
    _link_distributions({"sentencepiece": metadata.distribution("sentencepiece")}, sentencepiece)
    return python, sentencepiece


# Runs in the plain virtualenv.
PLAIN_SIDE = textwrap.dedent(
    """
    import importlib.util, json, sys
    from transformers import AutoTokenizer

    use_fast, probes, history, prompt, max_new, out_json, *exports = sys.argv[1:]
    use_fast, probes, history, max_new = use_fast == "fast", json.loads(probes), json.loads(history), int(max_new)
    def importable(name):
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package (google) is not there either
            return False

    absent = ["google.protobuf", "sentencepiece", "blip2_internlm", "lavis"]
    results = {"importable": [name for name in absent if importable(name)]}
    for export in exports:
        tokenizer = AutoTokenizer.from_pretrained(export, use_fast=use_fast)
        ids = [tokenizer(text).input_ids for text in probes]
        result = {
            "tokenizer": type(tokenizer).__name__,
            "ids": ids,
            "decoded": [tokenizer.decode(row, skip_special_tokens=True) for row in ids],
            "chat": tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False),
            "chat_ids": tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True),
        }
        if use_fast:  # the whole model too (the slow run only needs its tokenizer)
            import torch
            from PIL import Image, ImageDraw
            from transformers import AutoModelForVision2Seq, AutoProcessor

            image = Image.new("RGB", (80, 80), (235, 235, 235))
            ImageDraw.Draw(image).ellipse((10, 26, 38, 54), fill=(220, 30, 30))
            processor = AutoProcessor.from_pretrained(export)
            model = AutoModelForVision2Seq.from_pretrained(export).eval()
            result["processor"] = [type(processor).__name__, type(processor.tokenizer).__name__]
            inputs = processor(images=image, text=prompt, return_tensors="pt")
            result["input_ids"] = inputs["input_ids"][0].tolist()
            result["image_token_id"] = model.config.image_token_id
            if hasattr(processor, "qformer_tokenizer"):
                result["qformer_ids"] = [processor.qformer_tokenizer(text).input_ids for text in probes]
            with torch.no_grad():
                new = model.generate(**inputs, num_beams=1, max_new_tokens=max_new, min_new_tokens=max_new)
            result["new_tokens"] = new[0, inputs["input_ids"].shape[1]:].tolist()
        results[export] = result
    with open(out_json, "w") as f:
        json.dump(results, f, ensure_ascii=False)
    """
)


def run_plain(python, use_fast, exports, out_json, pythonpath=None):
    """PLAIN_SIDE in the plain virtualenv, from a folder without this package (``-c`` puts the folder on the path)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"} | ({"PYTHONPATH": str(pythonpath)} if pythonpath else {})
    args = [json.dumps(PROBES, ensure_ascii=False), json.dumps(HISTORY, ensure_ascii=False), PROMPT, str(MAX_NEW)]
    result = subprocess.run(
        [str(python), "-c", PLAIN_SIDE, "fast" if use_fast else "slow", *args, str(out_json), *map(str, exports)],
        cwd=out_json.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out_json.read_text(encoding="utf-8"))


def our_tokenization(model):
    """What the model's own tokenizers give for PROBES and HISTORY."""
    from blip2_internlm.models.blip2_internlm_instruct import Blip2InternLMInstruct
    from blip2_internlm.models.llm_inputs import segment_ids

    tokenizer = model.llm_tokenizer
    ids = [tokenizer(text).input_ids for text in PROBES]
    ours = {
        "ids": ids,
        "decoded": [tokenizer.decode(row, skip_special_tokens=True) for row in ids],
        "prompt_ids": [tokenizer.bos_token_id] + tokenizer(PROMPT, add_special_tokens=False).input_ids,
        "n_query": model.query_tokens.shape[1],
    }
    if isinstance(model, Blip2InternLMInstruct):
        conversation = model.conversations({"messages": [HISTORY]}, 1, with_answers=False)[0]
        ours["chat"] = model.template.render(conversation, True, tokenizer)
        ours["chat_ids"] = segment_ids(tokenizer, [model.template.generation_segments(conversation)])[0][0]
        ours["qformer_ids"] = [model.tokenizer(text).input_ids for text in PROBES]
    else:  # <s> and the user turns' text, verbatim
        text = "".join(message["content"] for message in HISTORY if message["role"] == "user")
        ours["chat"] = tokenizer.bos_token + text
        ours["chat_ids"] = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids
    return ours


@pytest.fixture(scope="module")
def exports(lavis_ready, tmp_path_factory):
    """The tiny BLIP-2 and instruction models exported: {arch: (directory, our tokenization)}."""
    import torch

    from blip2_internlm.factory import build_model
    from blip2_internlm.tools.export import export_to_hf

    tmp = tmp_path_factory.mktemp("exports")
    exported = {}
    for arch in ("blip2_internlm", "blip2_internlm_instruct"):
        torch.manual_seed(0)
        model = build_model(arch, "tiny", is_eval=True)
        exported[arch] = (export_to_hf(model, tmp / arch), our_tokenization(model))
    return exported


@pytest.fixture(scope="module")
def plain_fast(plain_python, exports, tmp_path_factory):
    python, _ = plain_python
    return run_plain(python, True, [path for path, _ in exports.values()], tmp_path_factory.mktemp("fast") / "out.json")


def test_the_plain_environment_has_neither_protobuf_nor_sentencepiece_nor_this_package(plain_fast):
    assert plain_fast["importable"] == []


@pytest.mark.parametrize("arch", ["blip2_internlm", "blip2_internlm_instruct"])
def test_export_loads_and_generates_without_protobuf(plain_fast, exports, arch):
    path, ours = exports[arch]
    theirs = plain_fast[str(path)]
    processor = {"blip2_internlm": "Blip2Processor", "blip2_internlm_instruct": "InstructBlipProcessor"}[arch]
    assert theirs["processor"] == [processor, "LlamaTokenizerFast"]
    # [queries] <s> prompt, as our model reads it
    assert theirs["input_ids"] == [theirs["image_token_id"]] * ours["n_query"] + ours["prompt_ids"]
    assert len(theirs["new_tokens"]) == MAX_NEW


@pytest.mark.parametrize("arch", ["blip2_internlm", "blip2_internlm_instruct"])
def test_fast_tokenizer_encodes_and_decodes_zh_en_and_special_tokens_as_ours(plain_fast, exports, arch):
    path, ours = exports[arch]
    theirs = plain_fast[str(path)]
    assert theirs["tokenizer"] == "LlamaTokenizerFast"
    for text, got, expected in zip(PROBES, theirs["ids"], ours["ids"], strict=True):
        assert got == expected, text
    assert theirs["decoded"] == ours["decoded"]


@pytest.mark.parametrize("arch", ["blip2_internlm", "blip2_internlm_instruct"])
def test_chat_template_renders_and_tokenizes_as_ours(plain_fast, exports, arch):
    path, ours = exports[arch]
    theirs = plain_fast[str(path)]
    assert theirs["chat"] == ours["chat"]
    assert theirs["chat_ids"] == ours["chat_ids"]


def test_qformer_tokenizer_encodes_as_ours(plain_fast, exports):
    path, ours = exports["blip2_internlm_instruct"]
    assert plain_fast[str(path)]["qformer_ids"] == ours["qformer_ids"]


def test_slow_tokenizer_needs_sentencepiece_only(plain_python, exports, tmp_path):
    python, sentencepiece = plain_python
    paths = [path for path, _ in exports.values()]
    theirs = run_plain(python, False, paths, tmp_path / "slow.json", pythonpath=sentencepiece)
    assert theirs["importable"] == ["sentencepiece"]
    for path, ours in exports.values():
        slow = theirs[str(path)]
        assert slow["tokenizer"] == "LlamaTokenizer"
        assert slow["ids"] == ours["ids"] and slow["decoded"] == ours["decoded"]
        assert slow["chat_ids"] == ours["chat_ids"]


def test_tokenizer_check_names_the_text_a_converted_tokenizer_decodes_otherwise(lavis_ready, tmp_path):
    from transformers import LlamaTokenizer

    from blip2_internlm.factory import build_model
    from blip2_internlm.internlm2.convert import check_tokenizer

    tokenizer = build_model("blip2_internlm", "tiny", is_eval=True).llm_tokenizer
    # transformers' default: a leading "▁" is dropped when decoding
    prefixed = LlamaTokenizer(vocab_file=tokenizer.vocab_file, legacy=True, add_prefix_space=True)
    with pytest.raises(ValueError, match="LlamaTokenizer .* decodes .* as 'leading'.*InternLM2Tokenizer as ' leading'"):
        check_tokenizer(tokenizer, [prefixed], probes=["中文", " leading"])
    check_tokenizer(tokenizer, [prefixed], probes=["中文"])
