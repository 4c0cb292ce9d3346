"""Janus (image-generation mode) and Emu3 ARGenAdapters on tiny random models saved + reloaded via from_pretrained.

Janus: the baseline loop reproduces transformers' own ``generate(generation_mode="image")`` token for token (bf16:
greedy tokens and the sampled distribution at every step).
Emu3: greedy reproduces transformers' prefix-constrained ``generate`` + negative-prompt CFG token for token, and
the sampled target distribution equals transformers' processed scores at every step of its own trajectory.
Both: feeding L > 1 tokens == feeding them one by one; ``truncate(n)`` + re-feed == never having fed the rest.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmfast.decoding import ar_decode
from mmfast.errors import InvalidInputError, UnsupportedModelError
from mmfast.models.argen import Sampling, target_probs, to_pil
from mmfast.models.emu3 import Emu3Adapter
from mmfast.models.janus import JanusAdapter
from mmfast.train.tiny_models import build_tiny_emu3, build_tiny_janus

PROMPTS = ["A red cat on a mat.", "A dog"]  # different lengths: left padding is exercised

# (guidance_scale, temperature, top_k, top_p); temperature 0 = greedy
SETTINGS = [(3.0, 1.0, 0, 1.0), (5.0, 0.7, 10, 1.0), (2.0, 1.3, 0, 0.8), (3.0, 0.0, 0, 1.0)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def janus_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_janus(tmp_path_factory.mktemp("janus"))


@pytest.fixture(scope="module")
def emu3_dir(tmp_path_factory: pytest.TempPathFactory):
    return build_tiny_emu3(tmp_path_factory.mktemp("emu3"))


@pytest.fixture(scope="module")
def janus(janus_dir) -> JanusAdapter:
    return JanusAdapter.from_pretrained(janus_dir)


@pytest.fixture(scope="module")
def emu3(emu3_dir) -> Emu3Adapter:
    return Emu3Adapter.from_pretrained(emu3_dir)


def _hf_kwargs(gs: float, temp: float, top_k: int, top_p: float) -> dict:
    if temp == 0:
        return dict(do_sample=False, guidance_scale=gs)
    return dict(do_sample=True, guidance_scale=gs, temperature=temp, top_k=top_k, top_p=top_p)


def _feed_one_by_one(session, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([session.forward(tokens[:, i : i + 1], torch.tensor([i])) for i in range(tokens.shape[1])], 1)


def _recording_multinomial(seen: list[torch.Tensor]):
    """A ``torch.multinomial`` that records the probabilities it samples from."""
    real = torch.multinomial

    def record(probs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append(probs.clone())
        return real(probs, *args, **kwargs)

    return record


def _check_session_properties(adapter, sampling: Sampling, tokens: torch.Tensor, atol: float) -> None:
    """L>1 == one by one; truncate(n) + re-feed == the uninterrupted run; rewinding by feeding an earlier position."""
    n = tokens.shape[1]
    one = adapter.session(PROMPTS, sampling)
    one.prefill()
    by_one = _feed_one_by_one(one, tokens)
    many = adapter.session(PROMPTS, sampling)
    many.prefill()
    at_once = many.forward(tokens, torch.arange(n))
    assert at_once.shape == (2 * len(PROMPTS), n, adapter.codebook_size)
    torch.testing.assert_close(at_once, by_one, rtol=0, atol=atol)
    torch.testing.assert_close(target_probs(at_once, sampling), target_probs(by_one, sampling), rtol=0, atol=1e-5)

    # truncate, then re-feed across a row boundary (Emu3: the EOL after row 0 must be re-created)
    many.truncate(3)
    assert many.length == 3
    again = many.forward(tokens[:, 3:9], torch.arange(3, 9))
    torch.testing.assert_close(again, at_once[:, 3:9], rtol=0, atol=atol)
    # a different continuation after truncation == a fresh session fed that sequence
    other = tokens.clone()
    other[:, 5:] = (other[:, 5:] + 1) % adapter.codebook_size
    got = many.forward(other[:, 5:], torch.arange(5, n))  # positions start before length 9: rewinds to 5
    fresh = adapter.session(PROMPTS, sampling)
    fresh.prefill()
    torch.testing.assert_close(got, fresh.forward(other, torch.arange(n))[:, 5:], rtol=0, atol=atol)
    # truncate(0) + prefill() gives the prompt logits back
    many.truncate(0)
    torch.testing.assert_close(many.prefill(), fresh.prefill())
    with pytest.raises(InvalidInputError):
        many.forward(tokens[:, 2:4], torch.tensor([2, 3]))  # gap: the cache holds 0 tokens
    with pytest.raises(InvalidInputError):
        many.forward(tokens[:, :2], torch.tensor([0, 2]))  # not consecutive


# --------------------------------------------------------------------------------------------------------------
# Janus
# --------------------------------------------------------------------------------------------------------------


def test_janus_adapter_shape(janus: JanusAdapter) -> None:
    assert (janus.grid, janus.num_tokens, janus.codebook_size, janus.conditioning) == ((4, 4), 16, 64, "text")
    vq = janus.model.model.vqmodel.quantize.embedding.weight
    assert torch.equal(janus.codebook_embeddings(), vq) and janus.codebook_embeddings().shape == (64, 8)
    enc = janus.encode_prompts(PROMPTS)
    assert (enc["input_ids"][:, -1] == janus.boi_token_id).all() and enc["attention_mask"][1, 0] == 0


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "gs{}-t{}-k{}-p{}".format(*s))
def test_janus_reproduces_transformers_generate(janus: JanusAdapter, setting: tuple) -> None:
    model, sampling = janus.model, Sampling(*setting)
    inputs = janus.encode_prompts(PROMPTS)
    seeds = [0] if sampling.greedy else [0, 1, 2]
    outs = []
    for seed in seeds:
        torch.manual_seed(seed)
        ref = model.generate(**inputs, generation_mode="image", **_hf_kwargs(*setting))
        torch.manual_seed(seed)
        ours = ar_decode(janus, PROMPTS, sampling, progress=False).tokens
        assert ref.shape == ours.shape == (2, 16)
        assert torch.equal(ours, ref), f"seed {seed}: {ours.tolist()} != {ref.tolist()}"
        outs.append(ours)
    if len(outs) > 1:  # the check is not vacuous: seeds give different images
        assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_janus_bf16_matches_transformers_generate(janus_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    """In bf16 transformers runs CFG / warpers / softmax in bf16 on a static cache; so do the session and
    ``target_probs`` (probabilities upcast + renormalised only at the end). Greedy: token for token. Sampled: the
    distribution equals the one transformers hands to ``torch.multinomial`` at every step of its own trajectory
    (its samples can still differ on rare draws: multinomial rounds ``p / Exp(1)`` in the dtype of ``p``)."""
    adapter = JanusAdapter.from_pretrained(janus_dir, dtype=torch.bfloat16)
    inputs = adapter.encode_prompts(PROMPTS)
    greedy = SETTINGS[3]
    ref = adapter.model.generate(**inputs, generation_mode="image", **_hf_kwargs(*greedy))
    assert torch.equal(ar_decode(adapter, PROMPTS, Sampling(*greedy), progress=False).tokens, ref)

    for setting in SETTINGS[:3]:
        sampling, seen = Sampling(*setting), []
        monkeypatch.setattr(torch, "multinomial", _recording_multinomial(seen))
        torch.manual_seed(0)
        ref = adapter.model.generate(**inputs, generation_mode="image", **_hf_kwargs(*setting))
        monkeypatch.undo()
        theirs = torch.stack(seen, dim=1).float()  # (B, 16, V) bf16 probabilities transformers sampled from
        assert theirs.dtype == torch.float32 and seen[0].dtype == torch.bfloat16
        session = adapter.session(PROMPTS, sampling)
        raw = torch.cat([session.prefill(), _feed_one_by_one(session, ref[:, :-1])], dim=1)  # one by one, as HF
        ours = target_probs(raw, sampling)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs / theirs.sum(-1, keepdim=True), rtol=0, atol=1e-6)


def test_janus_session_multi_token_and_truncate(janus: JanusAdapter, janus_dir) -> None:
    sampling = Sampling(3.0)
    torch.manual_seed(0)
    tokens = ar_decode(janus, PROMPTS, sampling, progress=False).tokens
    _check_session_properties(janus, sampling, tokens, atol=1e-4)  # float32 logits of magnitude ~15
    # in float64 the multi-token forward is the one-by-one computation up to rounding
    _check_session_properties(JanusAdapter.from_pretrained(janus_dir, dtype=torch.float64), sampling, tokens, 1e-10)
    # no CFG: B' = B
    session = janus.session(PROMPTS, Sampling(1.0))
    assert session.prefill().shape == (2, 1, 64)


def test_janus_decode(janus: JanusAdapter) -> None:
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    images = janus.decode(tokens)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    with torch.inference_mode():
        ref = to_pil(janus.model.decode_image_tokens(tokens).permute(0, 3, 1, 2))
    assert [im.tobytes() for im in images] == [im.tobytes() for im in ref]
    with pytest.raises(InvalidInputError):
        janus.decode(tokens[:, :8])


# --------------------------------------------------------------------------------------------------------------
# Emu3
# --------------------------------------------------------------------------------------------------------------


def test_emu3_adapter_shape(emu3: Emu3Adapter) -> None:
    assert (emu3.grid, emu3.codebook_size, emu3.image_area) == ((4, 4), 64, 1024)
    vocab = emu3.model.vocabulary_mapping
    assert emu3.visual_token_ids.tolist() == [vocab.img2bpe[k] for k in range(64)]
    assert emu3.codebook_embeddings().shape == (64, 4)
    enc = emu3.encode_prompts(PROMPTS)
    assert emu3.processor.tokenizer.decode(enc["input_ids"][0, -6:]).endswith("<|image start|>4*4<|image token|>")


@pytest.mark.parametrize("gs", [3.0, 1.0])
def test_emu3_greedy_reproduces_transformers_generate(emu3: Emu3Adapter, gs: float) -> None:
    sampling = Sampling(gs, temperature=0)
    ref, out = emu3.reference_generate(PROMPTS, sampling)
    # transformers' sequence: 4 rows of (4 visual tokens + EOL), then EOF, EOI, EOS
    prompt_len = emu3.encode_prompts(PROMPTS)["input_ids"].shape[1]
    image_part = out.sequences[:, prompt_len:]
    assert image_part.shape[1] == 4 * 5 + 3 and (image_part[:, 4:20:5] == emu3.eol_token_id).all()
    ours = ar_decode(emu3, PROMPTS, sampling, progress=False)
    assert torch.equal(ours.tokens, ref), f"{ours.tokens.tolist()} != {ref.tolist()}"
    assert ours.steps == 16  # one forward per visual token: the EOLs ride along
    # decode() == transformers' decode_image_tokens on its own sequence
    with torch.inference_mode():
        hf_pixels = emu3.model.decode_image_tokens(image_tokens=image_part, height=4, width=4)
    assert [im.tobytes() for im in emu3.decode(ours.tokens)] == [im.tobytes() for im in to_pil(hf_pixels)]


@pytest.mark.parametrize("seed", [0, 1])
def test_emu3_target_distribution_matches_transformers(emu3: Emu3Adapter, seed: int) -> None:
    """Along transformers' own sampled trajectory, ``target_probs`` of the session == softmax of transformers'
    processed scores (negative-prompt CFG on log-probs, prefix constraint, temperature, top-k, top-p) restricted to
    the visual tokens, at every visual step."""
    sampling = Sampling(3.0, temperature=0.9, top_k=20, top_p=0.95)
    torch.manual_seed(seed)
    ref, out = emu3.reference_generate(PROMPTS, sampling, output_scores=True)
    session = emu3.session(PROMPTS, sampling)
    raw = torch.cat([session.prefill(), session.forward(ref, torch.arange(16))[:, :-1]], dim=1)
    ours = target_probs(raw, sampling)
    steps = [i + i // 4 for i in range(16)]  # transformers' step index of visual token i (EOL steps skipped)
    theirs = torch.stack([out.scores[t].softmax(-1)[:, emu3.visual_token_ids] for t in steps], dim=1)
    torch.testing.assert_close(theirs.sum(-1), torch.ones(2, 16))  # all mass on visual tokens
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_emu3_session_multi_token_and_truncate(emu3: Emu3Adapter, emu3_dir) -> None:
    sampling = Sampling(3.0)
    torch.manual_seed(0)
    result = ar_decode(emu3, PROMPTS, sampling, progress=False)
    assert result.tokens.shape == (2, 16) and 0 <= result.tokens.min() and result.tokens.max() < 64
    _check_session_properties(emu3, sampling, result.tokens, atol=1e-4)
    _check_session_properties(
        Emu3Adapter.from_pretrained(emu3_dir, dtype=torch.float64), sampling, result.tokens, 1e-10
    )
    # the cache holds the prompt, n visual tokens and one EOL per completed row
    session = emu3.session(PROMPTS, sampling)
    session.prefill()
    session.forward(result.tokens[:, :9], torch.arange(9))
    assert session.cache.get_seq_length() == session.prompt_len + 9 + 2
    session.truncate(8)
    assert session.cache.get_seq_length() == session.prompt_len + 8 + 2
    session.truncate(7)
    assert session.cache.get_seq_length() == session.prompt_len + 7 + 1


def test_emu3_decode(emu3: Emu3Adapter) -> None:
    images = emu3.decode(torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0)))
    assert len(images) == 3 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)


# --------------------------------------------------------------------------------------------------------------
# loading / errors
# --------------------------------------------------------------------------------------------------------------


def test_wrong_model_types(janus: JanusAdapter, emu3: Emu3Adapter, janus_dir, emu3_dir, tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match="'emu3'"):
        JanusAdapter.from_pretrained(emu3_dir)
    with pytest.raises(UnsupportedModelError, match="'janus'"):
        Emu3Adapter.from_pretrained(janus_dir)
    with pytest.raises(UnsupportedModelError):
        JanusAdapter(emu3.model, emu3.processor)
    with pytest.raises(UnsupportedModelError):
        Emu3Adapter(janus.model, janus.processor)
    with pytest.raises(UnsupportedModelError, match="Could not load"):
        JanusAdapter.from_pretrained(tmp_path / "missing")
    for adapter in (janus, emu3):
        with pytest.raises(InvalidInputError):
            adapter.parse_conditions([3])
        with pytest.raises(InvalidInputError):
            adapter.parse_conditions(None)
