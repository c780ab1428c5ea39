"""The static decoding loop (blip2_internlm.models.decode) gives llm.generate's tokens, faster.

Everything in fp32 on the CPU with the tiny InternLM2 (GQA, dynamic-NTK rope), on left-padded
``[pad] [queries] <s> prompt`` inputs built as ``Blip2InternLM.generate`` builds them, prompts of
different lengths in one batch.
"""

import pytest
import torch

from blip2_internlm.internlm2.configuration import InternLM2Config
from blip2_internlm.internlm2.modeling import InternLM2ForCausalLM
from blip2_internlm.models import decode
from blip2_internlm.models.builders import load_frozen_llm
from blip2_internlm.models.decode import EosBan, generate_tokens
from blip2_internlm.models.llm_inputs import generation_embeds

PROMPTS = ["", "Question: what shape is at the top? Short answer:", "a photo of", "Question: how many circles?"]
EOS, PAD = 2, 2
# the model's end of text, and a word it often ends on (" center"): stopping on the second id is exercised
STOPS = [EOS, 322]


@pytest.fixture(scope="module")
def tiny():
    tokenizer, llm = load_frozen_llm("tiny", "fp32")
    queries = torch.randn(len(PROMPTS), 8, llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, mask = generation_embeds(tokenizer, llm.get_input_embeddings(), queries, PROMPTS)
    assert len(set(mask.sum(1).tolist())) == len(PROMPTS)  # every row has its own padding
    return llm, embeds, mask


def both(llm, embeds, mask, **kwargs):
    kwargs = {"eos_token_id": STOPS, "pad_token_id": PAD, "max_new_tokens": 10, "min_new_tokens": 2, **kwargs}
    reference = generate_tokens(llm, embeds, mask, implementation="transformers", **kwargs)
    static = generate_tokens(llm, embeds, mask, implementation="static", **kwargs)
    return reference, static


def stopped_on(tokens: torch.Tensor, stop: int, max_new_tokens: int = 10) -> bool:
    """Some row ended on ``stop`` before the length limit (what follows it is padding)."""
    for row in tokens.tolist():
        ends = [i for i, token in enumerate(row) if token == stop and all(t == PAD for t in row[i + 1 :])]
        if ends and ends[0] < max_new_tokens - 1:
            return True
    return False


def test_greedy_gives_generates_tokens_with_left_padding_min_length_and_two_stop_ids(tiny):
    reference, static = both(*tiny, num_beams=1)
    assert torch.equal(static, reference)
    assert stopped_on(reference, 322) and stopped_on(reference, EOS)


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=5, length_penalty=0.0, max_new_tokens=10, min_new_tokens=1),  # predict_answers
        dict(num_beams=4, num_return_sequences=3, length_penalty=1.5, min_new_tokens=4),
        dict(num_beams=3, num_return_sequences=2, repetition_penalty=1.3, early_stopping=True),
        dict(num_beams=5, length_penalty=-0.5, early_stopping="never", max_new_tokens=6, min_new_tokens=6),
    ],
    ids=["vqa-defaults", "3-returned-min-4", "repetition-early-stop", "forced-length-never"],
)
def test_beam_search_gives_generates_tokens(tiny, settings):
    reference, static = both(*tiny, **settings)
    assert torch.equal(static, reference)
    rows = len(PROMPTS) * settings.get("num_return_sequences", 1)
    assert static.shape[0] == rows


def test_beam_search_stops_on_either_stop_id_as_generate_does(tiny):
    reference, static = both(*tiny, num_beams=4, num_return_sequences=4, length_penalty=0.0)
    assert torch.equal(static, reference)
    assert stopped_on(reference, 322) and stopped_on(reference, EOS)


def test_sampling_draws_generates_tokens_from_the_same_seed(tiny):
    settings = dict(do_sample=True, top_p=0.9, temperature=0.8, num_return_sequences=3, max_new_tokens=8)
    torch.manual_seed(3)
    reference = generate_tokens(*tiny, implementation="transformers", eos_token_id=STOPS, pad_token_id=PAD, **settings)
    torch.manual_seed(3)
    static = generate_tokens(*tiny, implementation="static", eos_token_id=STOPS, pad_token_id=PAD, **settings)
    assert torch.equal(static, reference)


def test_compiled_step_gives_the_same_beams(tiny):
    # the compiled decoding step: tens of seconds of compilation on a small CPU
    settings = dict(eos_token_id=STOPS, pad_token_id=PAD, max_new_tokens=8, min_new_tokens=2, num_beams=4)
    reference = generate_tokens(*tiny, implementation="transformers", num_return_sequences=2, **settings)
    compiled = generate_tokens(*tiny, implementation="static", compile=True, num_return_sequences=2, **settings)
    assert torch.equal(compiled, reference)


def test_the_prefix_runs_once_per_image_not_once_per_beam(tiny, monkeypatch):
    llm, embeds, mask = tiny
    rows = []
    forward = llm.forward

    def recording(*args, **kwargs):
        rows.append(kwargs["inputs_embeds"].shape[0] if kwargs.get("inputs_embeds") is not None else None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm, "forward", recording)
    generate_tokens(llm, embeds, mask, implementation="static", num_beams=5, max_new_tokens=6, min_new_tokens=6)
    assert rows == [len(PROMPTS)]  # one model call, one row per image; the steps bypass forward
    rows.clear()
    generate_tokens(llm, embeds, mask, implementation="transformers", num_beams=5, max_new_tokens=6, min_new_tokens=6)
    assert rows[0] == 5 * len(PROMPTS) and len(rows) == 6


def test_a_dynamic_rope_crossing_its_threshold_mid_generation_matches_generate():
    torch.manual_seed(0)
    config = InternLM2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=12,  # prompts of 5-9 tokens and 8 new ones cross it
        rope_scaling={"type": "dynamic", "factor": 2.0},
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    llm = InternLM2ForCausalLM(config).eval()
    with torch.no_grad():
        for param in llm.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.3)  # decisive logits
    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    embeds = llm.get_input_embeddings()(ids).detach()
    for settings in (dict(num_beams=1), dict(num_beams=3, num_return_sequences=2)):
        reference, static = both(llm, embeds, mask, max_new_tokens=8, **settings)
        assert torch.equal(static, reference)


def test_what_the_loop_does_not_cover_runs_transformers_own_loop(tiny):
    settings = dict(num_beams=3, max_new_tokens=5, return_dict_in_generate=True, output_scores=True)
    reference = generate_tokens(*tiny, implementation="transformers", **settings)
    static = generate_tokens(*tiny, implementation="static", **settings)
    assert torch.equal(static.sequences, reference.sequences)
    assert torch.equal(static.sequences_scores, reference.sequences_scores)


def test_transformers_static_cache_gives_the_dynamic_caches_tokens(tiny):
    llm, embeds, mask = tiny
    for settings in (dict(num_beams=1), dict(num_beams=4, num_return_sequences=2)):
        kwargs = dict(eos_token_id=STOPS, pad_token_id=PAD, max_new_tokens=8, min_new_tokens=2, **settings)
        dynamic = llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        static = llm.generate(inputs_embeds=embeds, attention_mask=mask, cache_implementation="static", **kwargs)
        assert torch.equal(static, dynamic)


def test_eos_ban_sets_the_scores_transformers_min_length_processors_set():
    from transformers.generation.logits_process import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

    scores = torch.randn(6, 50)
    for processor in (
        MinLengthLogitsProcessor(4, [3, 7, 99], device="cpu"),  # 99: outside the vocabulary, bans nothing
        MinNewTokensLengthLogitsProcessor(2, 2, torch.tensor([3, 7])),
    ):
        for length in (2, 3, 4, 5):
            ids = torch.zeros(6, length, dtype=torch.long)
            assert torch.equal(EosBan(processor)(ids, scores.clone()), processor(ids, scores))


def test_an_unknown_implementation_is_an_error_naming_the_choices(tiny):
    with pytest.raises(ValueError, match=r"'static', 'transformers'"):
        generate_tokens(*tiny, implementation="fast")
    assert decode.IMPLEMENTATIONS == ("static", "transformers")


needs_onednn_bf16 = pytest.mark.skipif(
    decode.PackedLinears.unavailable(torch.nn.Linear(2, 2).bfloat16(), "cpu") is not None,
    reason="no oneDNN bf16 matmul on this CPU",
)


@pytest.fixture(scope="module")
def tiny_bf16(tiny):
    llm, embeds, mask = tiny
    return InternLM2ForCausalLM(llm.config).to(torch.bfloat16).eval().requires_grad_(False), embeds.bfloat16(), mask


@needs_onednn_bf16
def test_packed_bf16_weights_give_the_unpacked_steps_logits_bit_for_bit(tiny):
    llm, embeds, mask = tiny
    llm = InternLM2ForCausalLM(llm.config).to(torch.bfloat16).eval()
    plain = decode.PrefixSharedDecoder(llm, embeds.bfloat16(), mask, copies=1, max_steps=3)
    packed = decode.PrefixSharedDecoder(llm, embeds.bfloat16(), mask, copies=1, max_steps=3, prepack=True)
    assert torch.equal(plain.prefill(), packed.prefill())
    tokens = torch.tensor([5, 17, 300, 2])
    for _ in range(3):
        assert torch.equal(plain.step(tokens), packed.step(tokens))


@needs_onednn_bf16
def test_prepack_is_the_default_for_bf16_on_the_cpu_and_gives_the_same_beams(tiny_bf16, monkeypatch):
    llm, embeds, mask = tiny_bf16
    packs = []
    monkeypatch.setattr(decode.PackedLinears, "__init__", _counting(decode.PackedLinears.__init__, packs))
    settings = dict(eos_token_id=STOPS, pad_token_id=PAD, max_new_tokens=8, num_beams=4, length_penalty=0.0)
    default = generate_tokens(llm, embeds, mask, **settings)
    assert len(packs) == 1
    unpacked = generate_tokens(llm, embeds, mask, prepack=False, **settings)
    assert torch.equal(default, unpacked)
    generate_tokens(llm, embeds, mask, **settings)
    assert len(packs) == 1, "the packed weights are kept with the model between calls"
    with torch.no_grad():
        llm.output.weight.mul_(1.5)
    changed = generate_tokens(llm, embeds, mask, **settings)
    assert len(packs) == 2, "a changed weight is packed again"
    assert torch.equal(changed, generate_tokens(llm, embeds, mask, prepack=False, **settings))


def _counting(init, calls):
    def counted(self, *args, **kwargs):
        calls.append(1)
        init(self, *args, **kwargs)

    return counted


def test_prepack_refuses_weights_it_would_not_reproduce(tiny):
    llm, embeds, mask = tiny  # fp32: oneDNN's packed fp32 kernel rounds differently
    assert "bf16 only" in decode.PackedLinears.unavailable(llm, "cpu")
    with pytest.raises(ValueError, match="prepack=True: .*bf16 only"):
        generate_tokens(llm, embeds, mask, prepack=True, max_new_tokens=2, pad_token_id=PAD)
    reference, static = both(llm, embeds, mask, num_beams=3)  # the default leaves fp32 unpacked
    assert torch.equal(static, reference)


@needs_onednn_bf16
def test_a_model_that_generated_with_packed_weights_can_still_be_copied_and_pickled(tiny_bf16, tmp_path):
    import copy

    llm, embeds, mask = tiny_bf16
    settings = dict(eos_token_id=STOPS, pad_token_id=PAD, max_new_tokens=4, num_beams=2)
    tokens = generate_tokens(llm, embeds, mask, **settings)
    assert llm.__dict__.get(decode.PackedLinears.ATTRIBUTE) is not None
    twin = copy.deepcopy(llm)
    torch.save(llm, tmp_path / "llm.pt")
    loaded = torch.load(tmp_path / "llm.pt", weights_only=False)
    for model in (twin, loaded):
        assert model.__dict__.get(decode.PackedLinears.ATTRIBUTE) is None
        assert torch.equal(generate_tokens(model, embeds, mask, **settings), tokens)
