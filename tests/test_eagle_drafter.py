"""The EAGLE-style draft head recipe runs end to end and plugs into eagle_sd / lantern(drafter=...)."""

from __future__ import annotations

import torch

import mmfast
from mmfast.models.llamagen import LlamaGen, LlamaGenAdapter, LlamaGenConfig
from mmfast.models.vq import VQConfig, VQModel
from mmfast.train.tiny_ar_drafter import train_drafter


def _tiny_model_dir(tmp_path):
    torch.manual_seed(0)
    gpt = LlamaGen(LlamaGenConfig(dim=32, n_layer=2, n_head=4, vocab_size=16, block_size=64, num_classes=10,
                                  class_dropout_prob=0.1, initializer_range=0.2))
    torch.nn.init.normal_(gpt.output.weight, std=0.2)
    vq = VQModel(VQConfig(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 2], decoder_ch_mult=[1, 1, 2],
                          z_channels=8, ch=8, num_res_blocks=1, norm_groups=4, codebook_show_usage=False))
    LlamaGenAdapter(gpt, vq, id2label=[str(i) for i in range(10)], recommended={"guidance_scale": 2.0}).save_pretrained(tmp_path)
    return tmp_path


def test_drafter_recipe_and_decoders(tmp_path):
    path = _tiny_model_dir(tmp_path / "model")
    report = train_drafter(path, steps=3, batch=8, progress=False)
    assert (path / "drafter" / "drafter.safetensors").is_file() and report["steps"] == 3
    base = mmfast.pipeline("class-to-image", model=str(path))
    assert base.adapter.drafter_path == path / "drafter"
    ref = base(labels=[1, 2], seed=0, temperature=0, progress=False)
    for spec in ["eagle_sd(window=4)", "lantern(drafter='default',k=4,window=4)"]:
        pipe = mmfast.pipeline("class-to-image", model=base.adapter, accelerate=spec)
        out = pipe(labels=[1, 2], seed=0, temperature=0, progress=False)  # greedy: any drafter reproduces it
        assert torch.equal(out.tokens, ref.tokens)
        assert out.stats["steps"] <= ref.stats["steps"]
