"""tiny-var / tiny-var-small: the recipe's stages run and resume; the shipped pair is complete, shares one VQ-VAE and
draws recognisable digits (class consistency floor on fresh samples); CoDe on the pair."""

from __future__ import annotations

import json

import pytest
import torch

import mmfast
from mmfast import zoo
from mmfast.metrics import class_consistency
from mmfast.train import tiny_var as T

shipped = pytest.mark.skipif(not zoo.available().get("tiny-var-small"), reason="the tiny-var pair is not installed")


def test_recipe_stages_run_and_resume(tmp_path, one_thread):
    r = T.TinyVARRecipe(**{**T.asdict(T.TinyVARRecipe.quick()), "aug_copies": 0, "vq_steps": 3, "drafter_steps": 3,
                           "refiner_steps": 2})
    log = T._Log(tmp_path / "log.jsonl")
    vae = T.train_vae(r, tmp_path, log, resume=False)
    pool = T.encode_pool(r, vae, tmp_path, resume=False)
    assert pool["tokens"].shape == (898, 130) and int(pool["tokens"].max()) < r.vocab_size
    drafter = T.train_var("drafter", r, vae, pool, tmp_path, log, resume=False)
    assert log.rows("drafter")[-1]["step"] == 3 and torch.isfinite(torch.tensor(log.rows("drafter")[-1]["heldout"]))
    again = T.train_var("drafter", r, vae, pool, tmp_path, log, resume=True)  # a finished stage is reused as is
    assert all(torch.equal(a, b) for a, b in zip(drafter.state_dict().values(), again.state_dict().values()))
    refiner = T.train_var("refiner", r, vae, pool, tmp_path, log, resume=False)
    for name, m in (("big", drafter), ("small", refiner)):
        T.VARAdapter(m, vae, T.ID2LABEL, {"guidance_scale": 1.0}).save_pretrained(tmp_path / name)
    gen = mmfast.pipeline("class-to-image", model=str(tmp_path / "big"),
                          accelerate=f"code(refiner={str(tmp_path / 'small')!r},draft_scales=3)")
    out = gen([3, "seven"], seed=0, progress=False)
    assert out.tokens.shape == (2, 130) and out.images[0].size == (32, 32)


@shipped
def test_shipped_pair_is_small_and_shares_its_vae():
    a, b = zoo.zoo_path("tiny-var"), zoo.zoo_path("tiny-var-small")
    assert sum(f.stat().st_size for f in [*a.glob("*.safetensors"), *b.glob("*.safetensors")]) < 10e6
    assert (a / "vae.safetensors").read_bytes() == (b / "vae.safetensors").read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architecture"] == "var" and cfg["var"]["patch_nums"] == [1, 2, 3, 4, 6, 8]


@shipped
def test_class_consistency_of_the_shipped_pair_and_code():
    """Fresh samples (seed 0, not the report's): tiny-var >= 0.9, the refiner alone and CoDe N=5 >= 0.85."""
    labels = [i % 10 for i in range(100)]
    for model, spec, floor in (("tiny-var", None, 0.9), ("tiny-var-small", None, 0.85),
                               ("tiny-var", "code(refiner='tiny-var-small',draft_scales=5)", 0.85)):
        pipe = mmfast.pipeline("class-to-image", model=model, accelerate=spec)
        assert class_consistency(pipe(labels, seed=0, batch_size=50, progress=False).images, labels) >= floor, (model, spec)
