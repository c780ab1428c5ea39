"""The static decoding loop (blip2_internlm.models.decode) gives llm.generate's tokens, faster.

Everything in fp32 on the CPU with the tiny InternLM2 (GQA, dynamic-NTK rope), on left-padded
``[pad] [queries] <s> prompt`` inputs built as ``Blip2InternLM.generate`` builds them, prompts of
different lengths in one batch.

Why equal tokens hold on every CPU: both loops run in one process on the same kernels and the static
loop calls the model's own modules in its order; only the attention's sums are grouped differently
(shared prefix, own slots), which moves a logit by ~1e-5 (6e-6 measured on AVX-512-BF16 and on an
emulated AVX2 CPU), while the tiny model's choices are made by gaps of ~1e-2 (the smallest greedy gap in
these runs).  Which stop id ends which sequence when is scripted (:class:`ScriptedScores`), not left to
the model, whose weights are pretrained on the machine and so differ between CPUs.
"""

import pytest
import torch
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from blip2_internlm.internlm2.configuration import InternLM2Config
from blip2_internlm.internlm2.modeling import InternLM2ForCausalLM
from blip2_internlm.models import decode
from blip2_internlm.models.builders import load_frozen_llm
from blip2_internlm.models.decode import EosBan, generate_tokens
from blip2_internlm.models.llm_inputs import generation_embeds

pytestmark = pytest.mark.kernel_sensitive

PROMPTS = ["", "Question: what shape is at the top? Short answer:", "a photo of", "Question: how many circles?"]
EOS, PAD = 2, 2
# the model's end of text and a second stop id (" center"); the stop specs script when each is emitted
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


def stop_step(row: list[int], max_new_tokens: int = 10) -> tuple[int, int] | None:
    """(step, stop id) where ``row`` ended on a stop id before the length limit (only padding after it), or None."""
    for step, token in enumerate(row[: max_new_tokens - 1]):
        if token in STOPS and all(t == PAD for t in row[step + 1 :]):
            return step, token
    return None


class ScriptedScores(LogitsProcessor):
    """The next-token scores of a scripted language model in place of the model's, so that which stop id
    ends which sequence at which step is the same on every CPU.

    Appended after generate's own processors: a score they set to -inf (the min-length ban of the stop
    ids) stays -inf, every other score becomes the script's.  At step ``s`` the continuation token
    ``CONTINUATIONS[k] + s`` scores ``-k * 4**s`` (k = 0..3), every other token -1e4, and ``stops[image]``
    (``{step: {stop id: score}}``) adds the scripted stops.  The model still runs every step underneath
    (prefill and decoding on the left-padded inputs) but decides nothing: every score is an exact fp32
    value and the sum of every path of scripted tokens is distinct (ranks are base-4 digits; a stop adds
    the fraction 1/4 for id 322, 1/2 for eos, once), so no choice that shapes the output is a tie or a
    rounding (the -1e4 tokens tie, but never rank among a step's top ``num_beams``).
    """

    CONTINUATIONS = (400, 420, 440, 460)

    def __init__(self, stops: list[dict[int, dict[int, float]]], copies: int):
        self.stops, self.copies = stops, copies

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[-1]  # the prompt is embeddings: input_ids holds the new tokens only
        script = torch.full_like(scores, -1e4)
        for rank, first in enumerate(self.CONTINUATIONS):
            script[:, first + step] = -rank * 4.0**step
        for row in range(scores.shape[0]):
            for stop, score in self.stops[row // self.copies].get(step, {}).items():
                script[row, stop] = score
        return torch.where(scores == float("-inf"), scores, script)


#: per image, {step: {stop id: score}}: 322 at step 3; eos at step 5; eos wanted at step 1 (within
#: min_new_tokens=2, banned) and nothing after; 322 at step 2 (the first step allowed) and eos at step 4
STOP_SCRIPT = [{3: {322: 1.25}}, {5: {EOS: 2.5}}, {1: {EOS: 3.5}}, {2: {322: 0.25}, 4: {EOS: 0.5}}]


def scripted(llm, embeds, mask, copies: int, **settings):
    processors = LogitsProcessorList([ScriptedScores(STOP_SCRIPT, copies)])
    return both(llm, embeds, mask, min_new_tokens=2, max_new_tokens=10, logits_processor=processors, **settings)


def test_greedy_gives_generates_tokens_for_left_padded_prompts_of_different_lengths(tiny):
    """The model decides every token.  Both loops run on this CPU's kernels and differ only in how the
    attention's sums are grouped, which moves a logit by ~1e-5 (6e-6 measured, AVX-512 and emulated
    AVX2) against a smallest top-two gap of ~1e-2 in this run: the same argmax on every CPU."""
    reference, static = both(*tiny, num_beams=1)
    assert torch.equal(static, reference)
    assert reference.shape[0] == len(PROMPTS)


def test_greedy_stops_on_either_stop_id_after_min_length_as_generate_does(tiny):
    """Rows stop on 322 and on eos at the scripted steps, a stop inside ``min_new_tokens`` is banned, and
    finished rows are padded: the static loop (with :class:`EosBan` in place of transformers'
    min-length processor) gives generate's tokens."""
    reference, static = scripted(*tiny, copies=1, num_beams=1)
    assert torch.equal(static, reference)
    # the premise, on every CPU: the script's stops happened where it put them
    assert [stop_step(row) for row in reference.tolist()] == [(3, 322), (5, EOS), None, (2, 322)]
    assert reference.shape[1] == 10 and EOS not in reference[2].tolist()  # the banned stop at step 1 did not end it


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
    assert torch.equal(static, reference)  # same kernels both sides (module docstring): gaps far above rounding
    rows = len(PROMPTS) * settings.get("num_return_sequences", 1)
    assert static.shape[0] == rows


def test_beam_search_stops_on_either_stop_id_as_generate_does(tiny):
    """Beams finish on 322 and on eos at the scripted steps, in one image on both, none within
    ``min_new_tokens``; the finished and the full-length hypotheses are ranked and returned as generate
    returns them."""
    reference, static = scripted(*tiny, copies=4, num_beams=4, num_return_sequences=4, length_penalty=0.0)
    assert torch.equal(static, reference)
    # the premise, on every CPU: per image, which returned sequences ended on which stop id at which step
    ends = [[stop_step(row) for row in reference[image * 4 : image * 4 + 4].tolist()] for image in range(4)]
    assert ends[0] == [(3, 322), (3, 322), None, (3, 322)]
    assert ends[1] == [(5, EOS), (5, EOS), (5, EOS), None]
    assert ends[2] == [None] * 4  # eos scored best at step 1, inside min_new_tokens: banned
    assert ends[3] == [(4, EOS), (2, 322), None, (4, EOS)]


def test_sampling_draws_generates_tokens_from_the_same_seed(tiny):
    settings = dict(do_sample=True, top_p=0.9, temperature=0.8, num_return_sequences=3, max_new_tokens=8)
    torch.manual_seed(3)
    reference = generate_tokens(*tiny, implementation="transformers", eos_token_id=STOPS, pad_token_id=PAD, **settings)
    torch.manual_seed(3)
    static = generate_tokens(*tiny, implementation="static", eos_token_id=STOPS, pad_token_id=PAD, **settings)
    # the same seeded draws from probabilities ~1e-6 apart: only a draw that close to a bucket's edge could differ
    assert torch.equal(static, reference)


def test_compiled_step_gives_the_same_beams(tiny):
    # the compiled decoding step: tens of seconds of compilation on a small CPU
    settings = dict(eos_token_id=STOPS, pad_token_id=PAD, max_new_tokens=8, min_new_tokens=2, num_beams=4)
    reference = generate_tokens(*tiny, implementation="transformers", num_return_sequences=2, **settings)
    compiled = generate_tokens(*tiny, implementation="static", compile=True, num_return_sequences=2, **settings)
    # Inductor's fp32 kernels round where eager rounds (emulate_precision_casts): logits within ~1e-5 again
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
    # transformers' own loop on both sides: the same computation, bit for bit on any CPU
    assert torch.equal(static.sequences, reference.sequences)
    assert torch.equal(static.sequences_scores, reference.sequences_scores)


def test_transformers_static_cache_gives_the_dynamic_caches_tokens(tiny):
    llm, embeds, mask = tiny
    for settings in (dict(num_beams=1), dict(num_beams=4, num_return_sequences=2)):
        kwargs = dict(eos_token_id=STOPS, pad_token_id=PAD, max_new_tokens=8, min_new_tokens=2, **settings)
        dynamic = llm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        static = llm.generate(inputs_embeds=embeds, attention_mask=mask, cache_implementation="static", **kwargs)
        # transformers' loop both sides; the static cache only adds masked keys (weights exactly 0)
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
    # one oneDNN bf16 kernel on both sides, reading a weight reordered per call or once: the same sums; runs
    # only where oneDNN multiplies bf16 natively (AVX-512-BF16, AMX), skipped on AVX2
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
    assert torch.equal(default, unpacked)  # the packed step's logits are the plain ones bit for bit (spec above)
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
