"""LlamaGen GPT + adapter: official names / shapes, logits equal to the official module, cached decoding, I/O.

``fixtures/llamagen_ref.safetensors`` was produced by running the official ``autoregressive/models/gpt.py`` and
``generate.py`` (FoundationVision/LlamaGen) on tiny random configs (weights fp16-exact, stored as fp16; configs in
the metadata): teacher-forced logits, train-mode logits with seeded label dropout, the cached path with CFG
(prefill + 3 decode steps) and the tokens of ``generate()`` for a seed. ``llamagen_official_shapes.json`` holds
the official (name, shape) lists and parameter counts, built on the meta device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mmfast.decoding import ar_decode
from mmfast.errors import ConfigError, InvalidInputError, UnsupportedModelError
from mmfast.models.argen import Sampling
from mmfast.models.llamagen import (
    GPT_PRESETS,
    LlamaGen,
    LlamaGenAdapter,
    LlamaGenConfig,
    convert_official_checkpoint,
    rope_2d,
)
from mmfast.models.vq import VQConfig, VQModel

FIX = Path(__file__).parent / "fixtures"
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with safe_open(str(FIX / "llamagen_ref.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def official(ref, tag: str) -> LlamaGen:
    tensors, meta = ref
    model = LlamaGen(LlamaGenConfig.from_dict(json.loads(meta[f"{tag}.config"])))
    prefix = f"{tag}.sd."
    model.load_state_dict({k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return model.eval()


def tiny_vq(codebook_size: int = 32) -> VQModel:
    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=codebook_size, codebook_embed_dim=4, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
                   z_channels=8, ch=8, num_res_blocks=1, norm_groups=4, codebook_show_usage=False)
    return VQModel(cfg).eval()


# ---------------------------------------------------------------------------------------------------
# official configs: names, shapes, parameter counts (meta device)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes():
    return json.loads((FIX / "llamagen_official_shapes.json").read_text())


@pytest.mark.parametrize("key", ["GPT-B/c2i", "GPT-XL/c2i", "GPT-XL/t2i"])
def test_official_state_dict_names_and_shapes(shapes, key):
    name, model_type = key.split("/")
    entry = shapes["gpt"][key]
    with torch.device("meta"):
        model = LlamaGen(LlamaGenConfig.from_preset(name, model_type=model_type, **entry["kwargs"]))
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == entry["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]


def test_parameter_counts_of_every_preset(shapes):
    assert {k.split("/")[0] for k in shapes["gpt"]} == set(GPT_PRESETS)
    for key, entry in shapes["gpt"].items():
        name, model_type = key.split("/")
        with torch.device("meta"):
            model = LlamaGen(LlamaGenConfig.from_preset(name, model_type=model_type, **entry["kwargs"]))
        assert sum(p.numel() for p in model.parameters()) == entry["n_params"], key
    assert round(shapes["gpt"]["GPT-B/c2i"]["n_params"] / 1e6) == 111  # the paper's "111M"


def test_config_round_trip_and_validation():
    cfg = LlamaGenConfig.from_preset("GPT-XL", vocab_size=16384, block_size=576)
    assert LlamaGenConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.grid_size, cfg.head_dim, cfg.ffn_hidden) == (24, 64, 3584)  # int(8/3 * 1280) = 3413 → 3584
    with pytest.raises(ConfigError, match="unknown LlamaGen config keys"):
        LlamaGenConfig.from_dict({"dim": 64, "bogus": 1})
    with pytest.raises(ConfigError, match="square"):
        LlamaGenConfig(dim=64, n_head=4, block_size=15)
    with pytest.raises(ConfigError, match="preset"):
        LlamaGenConfig.from_preset("GPT-Z")


# ---------------------------------------------------------------------------------------------------
# numerical faithfulness vs the official module
# ---------------------------------------------------------------------------------------------------
def test_teacher_forcing_matches_official(ref):
    t, _ = ref
    cond, tokens = t["c2i.in.cond"], t["c2i.in.tokens"]
    with torch.no_grad():
        torch.testing.assert_close(official(ref, "c2i")(tokens[:, :-1], cond), t["c2i.out.teacher"], atol=ATOL, rtol=0)
        # grouped-query attention + ffn_dim_multiplier
        torch.testing.assert_close(official(ref, "gqa")(tokens[:2, :-1], cond[:2]), t["gqa.out.teacher"], atol=ATOL, rtol=0)
        # text-conditional: 120 left-padded caption tokens with the official padding mask
        out = official(ref, "t2i")(tokens[:2, :-1], t["t2i.in.caption"], t["t2i.in.mask"])
        torch.testing.assert_close(out, t["t2i.out.teacher"], atol=ATOL, rtol=0)


def test_train_mode_label_dropout_matches_official(ref):
    t, _ = ref
    model = official(ref, "c2i").train()
    model.config.class_dropout_prob = 0.5  # the fixture raised the official dropout_prob the same way
    cond, tokens = t["c2i.in.cond"], t["c2i.in.tokens"]
    torch.manual_seed(123)
    torch.testing.assert_close(model(tokens[:, :-1], cond), t["c2i.out.train_logits"], atol=ATOL, rtol=0)
    torch.manual_seed(123)
    loss = model.loss(tokens, cond)
    torch.testing.assert_close(loss.reshape(1), t["c2i.out.train_loss"], atol=ATOL, rtol=0)
    loss.backward()
    assert model.tok_embeddings.weight.grad is not None


@pytest.mark.parametrize("tag", ["c2i", "t2i"])
def test_cached_cfg_path_matches_official_generate_internals(ref, tag):
    """prefill + 3 one-token steps over the doubled (cond, uncond) batch == official setup_caches/prefill/decode."""
    t, _ = ref
    model, tokens = official(ref, tag), t["c2i.in.tokens"][:2]
    if tag == "c2i":
        cond, mask = t["c2i.in.cond"][:2], None
        cond = torch.cat([cond, model.null_condition(2)])
    else:
        cond, mask = t["t2i.in.caption"], t["t2i.in.mask"]
        cond, mask = torch.cat([cond, model.null_condition(2)]), torch.cat([mask, mask])
    with torch.no_grad():
        logits, cache = model.prefill(cond, mask)
        outs = [logits]
        for i in range(3):
            outs.append(model.step(tokens[:, i : i + 1].repeat(2, 1), torch.tensor([i]), cache))
        expected = t[f"{tag}.out.cached_cfg"]
        torch.testing.assert_close(torch.cat(outs, 1), expected, atol=ATOL, rtol=0)
        # truncate, then re-feed several tokens in one call (speculative-decoding style)
        cache.truncate(1)
        assert cache.length == 1
        out = model.step(tokens[:, 1:3].repeat(2, 1), torch.tensor([1, 2]), cache)
        torch.testing.assert_close(out, expected[:, 2:4], atol=ATOL, rtol=0)
        assert cache.length == 3


def test_adapter_t2i_session_left_pads_captions_like_official(ref):
    t, _ = ref
    adapter = LlamaGenAdapter(official(ref, "t2i"), None)
    caption, mask = t["t2i.in.caption"], t["t2i.in.mask"]
    prompts = [c[m] for c, m in zip(caption, mask)]  # the valid (unpadded) caption tokens
    session = adapter.session(prompts, Sampling(guidance_scale=7.5))
    outs = [session.prefill()]
    for i in range(3):
        outs.append(session.forward(t["c2i.in.tokens"][:2, i : i + 1], torch.tensor([i])))
    torch.testing.assert_close(torch.cat(outs, 1), t["t2i.out.cached_cfg"], atol=ATOL, rtol=0)


def test_ar_decode_reproduces_official_generate_tokens(ref):
    """Same seed → the tokens of the official generate(cfg_scale=4, top_k=8) with torch.manual_seed(0)."""
    t, _ = ref
    adapter = LlamaGenAdapter(official(ref, "c2i"), None)
    sampling = Sampling(guidance_scale=4.0, temperature=1.0, top_k=8)

    def run(seed: int) -> torch.Tensor:
        return ar_decode(adapter, [3, 7], sampling, torch.Generator().manual_seed(seed), progress=False).tokens

    first = run(0)
    assert torch.equal(first, t["c2i.out.generate_tokens"])
    assert torch.equal(run(0), first)  # same seed → identical tokens
    assert not torch.equal(run(1), first)


def test_cached_steps_equal_teacher_forcing_at_any_positions():
    torch.manual_seed(0)
    cfg = LlamaGenConfig(dim=32, n_layer=2, n_head=4, n_kv_head=2, multiple_of=16, vocab_size=24, num_classes=3,
                         block_size=16)
    model = LlamaGen(cfg).eval()
    torch.nn.init.normal_(model.output.weight, std=0.3)
    tokens, cond = torch.randint(0, 24, (2, 16)), torch.tensor([0, 2])
    with torch.no_grad():
        full = model(tokens[:, :-1], cond)
        logits, cache = model.prefill(cond)
        steps = [logits] + [model.step(tokens[:, i : i + 1], torch.tensor([i]), cache) for i in range(15)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=ATOL, rtol=0)
        # positions drive the 2-D RoPE: the same token fed at another grid cell gives other logits
        cache.truncate(5)
        at5 = model.step(tokens[:, 5:6], torch.tensor([5]), cache)
        cache.truncate(5)
        at9 = model.step(tokens[:, 5:6], torch.tensor([9]), cache)
        assert not torch.allclose(at5, at9)
        with pytest.raises(InvalidInputError):
            model.step(tokens[:, :1], torch.tensor([16]), cache)
        with pytest.raises(InvalidInputError):
            cache.truncate(99)


def test_rope_zeroes_condition_positions_and_splits_row_column():
    rope = rope_2d(torch.tensor([-1, 0, 1, 4]), grid=4, head_dim=8, base=10000)
    assert rope.shape == (4, 4, 2)
    assert torch.all(rope[0] == 0)  # condition token: cos = sin = 0 (official quirk)
    cos = rope[..., 0]
    assert torch.allclose(cos[1], torch.ones(4))  # (row 0, col 0) → identity
    assert torch.allclose(cos[2, :2], torch.ones(2)) and not torch.allclose(cos[2, 2:], torch.ones(2))  # col 1
    assert not torch.allclose(cos[3, :2], torch.ones(2)) and torch.allclose(cos[3, 2:], torch.ones(2))  # row 1


# ---------------------------------------------------------------------------------------------------
# adapter: conditions, CFG batching, I/O
# ---------------------------------------------------------------------------------------------------
def tiny_adapter(**kw) -> LlamaGenAdapter:
    torch.manual_seed(0)
    cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=4, multiple_of=16, vocab_size=32, num_classes=10, block_size=16)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return LlamaGenAdapter(LlamaGen(cfg), tiny_vq(), id2label=kw.pop("id2label", names),
                           recommended={"guidance_scale": 2.0, "top_k": 8, "temperature": 1.0}, **kw)


def test_parse_conditions_labels_and_prompts():
    adapter = tiny_adapter()
    assert adapter.parse_conditions(["digit 7", "7", "seven", "Seven", 3, "a handwritten 2!"]) == [7, 7, 7, 7, 3, 2]
    assert adapter.parse_conditions(torch.tensor([1, 4])) == [1, 4]
    assert adapter.parse_conditions(5) == adapter.parse_conditions(np.int64(5)) == [5]
    assert tiny_adapter(id2label=[str(i) for i in range(10)]).parse_conditions(["digit 9", "nine"]) == [9, 9]
    for bad in (["digit 12"], [10], [True], ["3 or 4"], ["cat"], []):
        with pytest.raises(InvalidInputError):
            adapter.parse_conditions(bad)


def test_session_doubles_batch_for_cfg_and_truncates():
    adapter = tiny_adapter()
    s = adapter.session(["3", 5], Sampling(guidance_scale=3.0))
    raw = s.prefill()
    assert raw.shape == (4, 1, 32) and (s.batch, s.length) == (2, 0)
    out = s.forward(torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1]))
    assert out.shape == (4, 2, 32) and s.length == 2
    s.truncate(1)
    assert s.length == 1
    assert adapter.session([1], Sampling()).prefill().shape == (1, 1, 32)
    assert adapter.target_probs(raw, Sampling(guidance_scale=3.0)).shape == (2, 1, 32)


def test_no_null_class_means_no_cfg():
    cfg = LlamaGenConfig(dim=32, n_layer=1, n_head=4, vocab_size=32, num_classes=4, block_size=4, class_dropout_prob=0.0)
    model = LlamaGen(cfg)
    assert model.cls_embedding.embedding_table.weight.shape == (4, 32)  # official: no null row without dropout
    with pytest.raises(ConfigError, match="null class"):
        LlamaGenAdapter(model, None).session([1], Sampling(guidance_scale=2.0))


def test_save_load_round_trip_and_decode(tmp_path):
    adapter = tiny_adapter()
    adapter.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "llamagen" and cfg["recommended"]["guidance_scale"] == 2.0
    loaded = LlamaGenAdapter.from_pretrained(tmp_path, device="cpu")
    assert isinstance(loaded, LlamaGenAdapter) and loaded.grid == (4, 4) and loaded.codebook_size == 32
    for a, b in zip(adapter.gpt.state_dict().values(), loaded.gpt.state_dict().values()):
        assert torch.equal(a, b)
    sampling = Sampling(guidance_scale=2.0, top_k=8)
    res = ar_decode(loaded, ["digit 1", "two"], sampling, torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(res.tokens, ar_decode(adapter, [1, 2], sampling, torch.Generator().manual_seed(0), progress=False).tokens)
    images = loaded.decode(res.tokens)
    assert len(images) == 2 and images[0].size == (8, 8) and images[0].mode == "RGB"
    assert loaded.codebook_embeddings().shape == (32, 4)
    with pytest.raises(UnsupportedModelError):
        LlamaGenAdapter.from_pretrained(tmp_path / "missing")


def test_convert_official_checkpoint(tmp_path):
    """A fake official .pt layout: {"model", "ema", "optimizer", "steps", "args": Namespace}; safe loader only."""
    src = tiny_adapter()
    gpt_sd = {k: v + 1.0 if v.is_floating_point() else v for k, v in src.gpt.state_dict().items()}
    args = argparse.Namespace(gpt_model="GPT-B", lr=1e-4)
    torch.save({"model": src.gpt.state_dict(), "ema": gpt_sd, "optimizer": {}, "steps": 10, "args": args}, tmp_path / "gpt.pt")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in src.vq.state_dict().items()}, "args": args}, tmp_path / "vq.pt")
    tiny = {"n_layer": 1, "n_head": 4, "dim": 32, "multiple_of": 16, "vocab_size": 32}
    vq_kw = {"encoder_ch_mult": [1, 2], "decoder_ch_mult": [1, 2], "z_channels": 8, "ch": 8, "num_res_blocks": 1,
             "norm_groups": 4, "codebook_embed_dim": 4}
    out = convert_official_checkpoint(tmp_path / "gpt.pt", tmp_path / "vq.pt", tmp_path / "conv", "GPT-B", "VQ-16",
                                      image_size=8, num_classes=10, codebook_size=32, use_ema=True,
                                      gpt_overrides=tiny, vq_overrides=vq_kw)
    loaded = LlamaGenAdapter.from_pretrained(out)
    assert loaded.recommended == {"guidance_scale": 4.0, "top_k": 2000, "temperature": 1.0, "top_p": 1.0}
    assert torch.equal(loaded.gpt.output.weight, gpt_sd["output.weight"])  # the EMA weights were taken
    assert torch.equal(loaded.vq.codebook(), src.vq.codebook())
    with pytest.raises(UnsupportedModelError, match="does not match"):
        convert_official_checkpoint(tmp_path / "gpt.pt", tmp_path / "vq.pt", tmp_path / "bad", "GPT-B", "VQ-16",
                                    image_size=8, num_classes=20, codebook_size=32, gpt_overrides=tiny, vq_overrides=vq_kw)


class _NotWeights:
    pass


def test_converter_refuses_arbitrary_pickles(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _NotWeights()}, tmp_path / "evil.pt")
    with pytest.raises(UnsupportedModelError, match="refuses to unpickle"):
        convert_official_checkpoint(tmp_path / "evil.pt", tmp_path / "evil.pt", tmp_path / "out")
