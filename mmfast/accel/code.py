"""CoDe: Collaborative Decoding of a VAR model (a large drafter + a small refiner sharing one VQ-VAE).

Chen et al., "Collaborative Decoding Makes Visual Auto-Regressive Modeling Efficient", CVPR 2025, arXiv 2411.17787
(code: czg1225/CoDe, ``autoregressive_infer_cfg_draft`` / ``_refine``). Next-scale prediction spends few FLOPs on
the small early scales that fix the image's content and most on the large late scales that add detail, so:

1. the **drafter** (the large model, e.g. VAR-d30) generates scales ``0 .. N-1`` (``draft_scales = N``) as usual;
2. it hands over its accumulated ``f_hat`` and the continuous next-scale inputs of scales ``1 .. N`` (the
   reference's ``token_hub``); **no KV cache crosses between the models**;
3. the **refiner** (e.g. VAR-d16) embeds those inputs with its own ``word_embed``, pre-fills the whole prefix
   (sos + scales 1..N, ``exit_points[N]`` tokens) in ONE pass under the block-causal mask, building its own KV
   cache, samples scale ``N`` from the prefix's last block and continues scale by scale to the end.

Both loops are :func:`mmfast.decoding.scale_decode` (with the same sampling: scale-ramped CFG, top-k, top-p and one
generator stream). ``draft_scales = K`` (all scales) is the drafter alone token for token; ``0`` is the refiner
alone. Paper defaults: N = 8 of 10 scales (1.7x, FID 1.95 -> 1.98) or N = 6 (2.9x). The refiner should share the
drafter's VQ-VAE: it is checked (codebook and scales).

Departures: the reference re-seeds the refiner's generator with the drafter's seed and draws throw-away samples for
every pre-filled scale; here one generator continues from the drafter (same distribution, fewer draws). The
reference's fine-tuned pair (drafter fine-tuned on small scales, refiner distilled on large ones) is a training
choice: any two VAR models on one VQ-VAE work training-free, as its authors note.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from mmfast.accel.base import DecodeAccelerator, register
from mmfast.errors import ConfigError, IncompatibleAcceleratorError, InvalidInputError


@register
@dataclass
class CoDe(DecodeAccelerator):
    """CoDe: the model drafts ``draft_scales`` scales, ``refiner`` (zoo name, directory or VARAdapter) finishes.

    ``refiner="self"`` hands off to the drafter itself (a check of the hand-off: it equals the drafter alone)."""

    name = "code"
    order = "scales"
    refiner: Any = "tiny-var-small"
    draft_scales: int = 4

    def validate(self) -> None:
        if isinstance(self.draft_scales, bool) or not isinstance(self.draft_scales, int) or self.draft_scales < 0:
            raise ConfigError(f"code: draft_scales must be an integer >= 0, got {self.draft_scales!r}.")
        if not (isinstance(self.refiner, str) and self.refiner) and getattr(self.refiner, "order", None) != "scales":
            raise ConfigError("code: refiner must be a zoo name, a VAR checkpoint directory or a VARAdapter.")
        self._refiner: Any = None

    def params(self) -> dict[str, Any]:
        ref = self.refiner if isinstance(self.refiner, str) else f"<{type(self.refiner).__name__}>"
        return {"refiner": ref, "draft_scales": self.draft_scales}

    def refiner_adapter(self, drafter: Any) -> Any:
        """The refiner's adapter (loaded once, on the drafter's device), checked to share the drafter's VQ-VAE."""
        if self.refiner == "self":
            return drafter
        if self._refiner is None:
            if isinstance(self.refiner, str):
                from mmfast.api import load_argen

                self._refiner = load_argen(self.refiner, device=drafter.model.device)[0]
            else:
                self._refiner = self.refiner
            r = self._refiner
            if getattr(r, "order", None) != "scales":
                raise IncompatibleAcceleratorError(f"code: the refiner {self.refiner!r} is not a next-scale (VAR) model.")
            same = r.patch_nums == drafter.patch_nums and r.codebook_size == drafter.codebook_size and torch.allclose(
                r.codebook_embeddings().cpu(), drafter.codebook_embeddings().cpu())
            if not same:
                raise IncompatibleAcceleratorError(
                    "code: the refiner must share the drafter's VQ-VAE (same scales and codebook): the hand-off is "
                    "in that latent space.")
        return self._refiner

    def decode(self, adapter: Any, conditions: list[Any], sampling: Any, generator: Any, callback: Any = None,
               progress: Any = True) -> Any:
        from mmfast.decoding import DecodeResult, scale_decode

        k = len(adapter.patch_nums)
        if self.draft_scales > k:
            raise InvalidInputError(f"code: draft_scales={self.draft_scales} exceeds the model's {k} scales.")
        refiner = self.refiner_adapter(adapter)
        t0 = time.perf_counter()
        draft = scale_decode(adapter, conditions, sampling, generator, stop=self.draft_scales, callback=callback,
                             progress=progress)
        t1 = time.perf_counter()
        res = draft
        if self.draft_scales < k:
            res = scale_decode(refiner, conditions, sampling, generator, draft=draft.draft, callback=callback,
                               progress=progress)
        t2 = time.perf_counter()
        stats = {"steps": draft.steps + (res.steps if res is not draft else 0), "tokens": int(res.tokens.shape[1]),
                 "wall_ms": (t2 - t0) * 1e3, "drafter_ms": (t1 - t0) * 1e3, "refiner_ms": (t2 - t1) * 1e3,
                 "draft_scales": self.draft_scales}
        return DecodeResult(tokens=res.tokens, steps=stats["steps"], stats=stats, draft=res.draft)
