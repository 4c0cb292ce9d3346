"""LlamaGen VQ tokenizer: official names / shapes, outputs equal to the official module, codebook access, losses.

``fixtures/vq_ref.safetensors`` was produced by the official ``tokenizer/tokenizer_image/vq_model.py`` on a tiny
config (ch 8, ch_mult (1, 2, 2), 1 res block, codebook 32 x 4; its GroupNorm patched from 32 to 4 groups, which
mmfast exposes as ``norm_groups``): encode indices, ``decode_code`` output, reconstruction and training losses,
with and without the L2-normalised codebook.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mmfast.errors import ConfigError, InvalidInputError
from mmfast.models.vq import VQ_PRESETS, VQConfig, VQModel

FIX = Path(__file__).parent / "fixtures"
ATOL = 1e-5


@pytest.fixture(scope="module")
def ref():
    with safe_open(str(FIX / "vq_ref.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["vq.config"])


def official(ref, l2: bool) -> VQModel:
    tensors, cfg = ref
    model = VQModel(VQConfig(**cfg, codebook_l2_norm=l2))
    model.load_state_dict({k[6:]: v.float() for k, v in tensors.items() if k.startswith("vq.sd.")}, strict=True)
    return model.eval()


@pytest.mark.parametrize("name", list(VQ_PRESETS))
def test_official_state_dict_names_and_shapes(name):
    entry = json.loads((FIX / "llamagen_official_shapes.json").read_text())["vq"][name]
    with torch.device("meta"):
        model = VQModel(VQConfig.from_preset(name))
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == entry["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == entry["n_params"]
    assert model.config.downsample == (16 if name == "VQ-16" else 8)


@pytest.mark.parametrize("tag", ["l2", "raw"])
def test_matches_official(ref, tag):
    t, _ = ref
    model, x = official(ref, tag == "l2"), t["vq.in.images"]
    with torch.no_grad():
        idx = model.encode(x)
        assert torch.equal(idx, t[f"vq.out.{tag}.indices"])
        torch.testing.assert_close(model.decode_code(idx), t[f"vq.out.{tag}.decoded"], atol=ATOL, rtol=0)
        torch.testing.assert_close(model(x).recon, t[f"vq.out.{tag}.recon"], atol=ATOL, rtol=0)
        model.train()
        losses = model(x).losses
    got = torch.stack([losses["codebook"], losses["commit"], losses["entropy"]])
    torch.testing.assert_close(got, t[f"vq.out.{tag}.losses"], atol=ATOL, rtol=0)


def test_codebook_views_and_flat_decode(ref):
    model = official(ref, True)
    raw, normed = model.codebook(), model.codebook(normalized=True)
    assert raw.shape == normed.shape == (32, 4)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(32)) and not torch.allclose(raw.norm(dim=-1), torch.ones(32))
    idx = ref[0]["vq.out.l2.indices"]
    with torch.no_grad():
        torch.testing.assert_close(model.decode_code(idx.flatten(1), grid=(4, 4)), model.decode_code(idx))
    with pytest.raises(InvalidInputError):
        model.decode_code(idx.flatten(1))
    with pytest.raises(InvalidInputError):
        model.encode(torch.zeros(1, 1, 16, 16))


def test_training_loss_backward_and_usage():
    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 2], decoder_ch_mult=[1, 2],
                   z_channels=8, ch=8, num_res_blocks=1, norm_groups=4, entropy_loss_ratio=0.1)
    model = VQModel(cfg).train()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    loss, logs = model.loss(x)
    loss.backward()
    assert set(logs) == {"recon", "codebook", "commit", "entropy", "usage"} and 0 < logs["usage"] <= 1
    assert model.encoder.conv_in.weight.grad is not None and model.quantize.embedding.weight.grad is not None
    assert model.quantize.codebook_used[-32:].ne(0).any()  # 2 x 4 x 4 codes went into the rolling window


def test_config_round_trip_and_validation():
    cfg = VQConfig.from_preset("VQ-8", codebook_show_usage=False)
    assert VQConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="norm_groups"):
        VQConfig(ch=8)  # 8 channels cannot form the official 32 groups
    with pytest.raises(ConfigError, match="unknown VQ config"):
        VQConfig.from_dict({"bogus": 1})
    with pytest.raises(ConfigError, match="preset"):
        VQConfig.from_preset("VQ-4")
