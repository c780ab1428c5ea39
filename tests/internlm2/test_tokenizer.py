"""InternLM2Tokenizer: ids and decoding as the official slow tokenizer, and the newline piece."""

import pickle

import pytest
import sentencepiece as spm

from blip2_internlm.internlm2 import InternLM2Tokenizer, newline_token_id

TEXTS = [
    "Hello world",
    "A photo of a cat sitting on a table.",
    "你好，世界！",
    "一只猫坐在木桌上，旁边放着一杯咖啡。",
    "Mixed 中文 and English 文本",
    "2024年 3.14159 1,250,000",
    "  two leading spaces, trailing  ",
    "tab\tseparated\tvalues",
    "line one\nline two\n\nline four\n",
    "\n",
    "😀 emoji and rare 字符 fall back to bytes",
]


@pytest.fixture(scope="module")
def sp(tiny_dir):
    return spm.SentencePieceProcessor(model_file=str(tiny_dir / "tokenizer.model"))


def test_special_tokens_follow_the_official_tokenizer(tokenizer):
    assert isinstance(tokenizer, InternLM2Tokenizer)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("</s>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 0)
    ids = tokenizer("Hello world").input_ids
    assert ids[0] == 1 and ids.count(1) == 1  # BOS added once
    assert 2 not in ids  # no EOS
    assert tokenizer("Hello world", add_special_tokens=False).input_ids == ids[1:]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_are_bos_plus_sentencepiece_ids(tokenizer, sp, text):
    assert tokenizer(text).input_ids == [1] + sp.encode(text)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # official quirk: one space opens a run of special tokens
    assert tokenizer.decode(ids) == " <s>" + text


def test_decode_keeps_the_official_quirks(tokenizer):
    # clean_up_tokenization always runs inside convert_tokens_to_string ...
    assert tokenizer.decode(tokenizer("Hello , world !").input_ids, skip_special_tokens=True) == "Hello, world!"
    # ... and the space goes before the text that precedes a special token
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    ids = tokenizer(chat).input_ids
    assert ids[1] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == " <s><|im_start|> user\nhi<|im_end|>\n"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_chat_tokens_are_single_special_ids(tokenizer):
    for token in ("<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>", "<|interpreter|>", "<|plugin|>"):
        ids = tokenizer(token, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token
        assert token in tokenizer.all_special_tokens
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_newline_token_is_the_real_newline_piece(tokenizer, sp):
    nl = tokenizer.newline_token_id
    assert nl == newline_token_id(sp)
    assert tokenizer.convert_ids_to_tokens(nl) == "<0x0A>"
    assert not tokenizer.convert_ids_to_tokens(nl).startswith("▁")
    assert tokenizer("\n", add_special_tokens=False).input_ids == [nl]
    # a newline inside text is the same id, so generation can stop on it
    assert tokenizer("a caption.\nnext", add_special_tokens=False).input_ids.count(nl) == 1
    assert tokenizer.decode([nl]) == "\n"


def test_newline_helper_skips_a_dummy_prefix_piece(tmp_path):
    """With a model that adds the "▁" dummy prefix, "\\n" is ["▁", "<0x0A>"]; the helper gives the latter."""
    import io

    from blip2_internlm.tiny.internlm2 import BUILTIN_CORPUS, SPM_TRAINER_OPTIONS

    model = io.BytesIO()
    options = {**SPM_TRAINER_OPTIONS, "add_dummy_prefix": True}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(BUILTIN_CORPUS),
        model_writer=model,
        vocab_size=600,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    assert [proc.id_to_piece(i) for i in proc.encode("\n")] == ["▁", "<0x0A>"]
    assert proc.id_to_piece(newline_token_id(proc)) == "<0x0A>"


def test_padding_side_and_batch(tokenizer):
    batch = tokenizer(["短", "a much longer English caption"], padding=True, padding_side="left")
    first = batch.input_ids[0]
    assert first[: first.index(1)] == [2] * first.index(1)  # left-padded with </s>
    assert batch.attention_mask[0][: first.index(1)] == [0] * first.index(1)


def test_save_reload_and_pickle_keep_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = InternLM2Tokenizer.from_pretrained(tmp_path)
    copy = pickle.loads(pickle.dumps(tokenizer))
    for text in TEXTS:
        assert again(text).input_ids == tokenizer(text).input_ids == copy(text).input_ids
    assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer.sp_model.serialized_model_proto()


def test_special_tokens_mask_matches_the_built_sequence(tokenizer):
    enc = tokenizer("Hello world", return_special_tokens_mask=True)
    assert len(enc.special_tokens_mask) == len(enc.input_ids)
    assert enc.special_tokens_mask == [1] + [0] * (len(enc.input_ids) - 1)
