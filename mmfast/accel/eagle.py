"""EAGLE-style draft head for LlamaGen models, and plain (strict) speculative decoding with it.

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", ICML 2024, arXiv 2401.15077 —
the drafter LANTERN builds on (LANTERN's reference trains an EAGLE head for LlamaGen: one decoder layer,
SmoothL1 on features + 0.1 x cross-entropy).

The head drafts at the feature level: from the target's feature ``f_{j-1}`` (the normed hidden state that
predicted token ``x_j``) and the embedding of ``x_j`` it predicts ``f_j``; the target's own output layer turns
``f_j`` into the draft distribution ``q`` for ``x_{j+1}``. Drafting then continues on its own predicted
features. It runs on both CFG rows (conditional and null class), and ``q`` goes through the same
:meth:`target_probs` processing as the target, so ``q`` is as close to ``p`` as the head can make it.

``eagle_sd(drafter=...)`` is exact speculative sampling with this drafter (the "naive SD" baseline of the
LANTERN paper); ``lantern(drafter=...)`` relaxes its acceptance. For clarity the head re-runs its single
layer over the whole prefix at each draft step (no draft KV cache): a 64-token image costs little.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmfast.accel.base import DecodeAccelerator, register
from mmfast.accel.sjd import _check_window
from mmfast.accel.speculative import Drafter, StrictRule, speculative_decode
from mmfast.errors import ConfigError, IncompatibleAcceleratorError, UnsupportedModelError
from mmfast.models.argen import ARGenAdapter


class EagleHead(nn.Module):
    """fc([f_{j-1}; e(x_j)]) → one decoder block of the target's family (its RoPE at x_j's position) → predicted
    feature f_j. The block and its RoPE come from the adapter (capability ``"draft_head"``)."""

    def __init__(self, adapter: ARGenAdapter):
        super().__init__()
        dim = adapter.feature_dim
        self.fc = nn.Linear(2 * dim, dim, bias=False)
        self.block = adapter.draft_block()
        self._rope = adapter.draft_rope

    def forward(self, feats: torch.Tensor, emb: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """feats (B, T, d) features f_{j-1}, emb (B, T, d) embeddings of x_j, positions (T,) of x_j → (B, T, d)."""
        h = self.fc(torch.cat([feats, emb], dim=-1))
        mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).tril()[None, None]
        out, _ = self.block(h, self._rope(positions), mask)
        return out


def _check(adapter: ARGenAdapter) -> ARGenAdapter:
    if "draft_head" not in getattr(adapter, "capabilities", ()):
        raise IncompatibleAcceleratorError(f"{type(adapter).__name__} offers no draft-head features (capability 'draft_head').")
    return adapter


class EagleDrafter(Drafter):
    """Chain drafts from an :class:`EagleHead`, using the target features the adapter captures (the normed hidden
    states that feed the output layer)."""

    def __init__(self, head: EagleHead):
        self.head = head.eval()

    def reset(self, adapter, batch, sampling, generator) -> None:  # type: ignore[override]
        super().reset(adapter, batch, sampling, generator)
        _check(adapter)
        self.rows = 2 * batch if sampling.cfg else batch
        n = adapter.num_tokens
        self.feats = torch.zeros(self.rows, n + 1, adapter.feature_dim)  # index j + 1 = feature at position j
        self.fed = 0  # positions whose target features are known: -1 .. fed - 2
        self._hook = adapter.capture_features(self._capture)
        self._pending: list[torch.Tensor] = []
        self.feats_from = -1  # position of the first feature in the next captured block

    def _capture(self, out: torch.Tensor) -> None:
        self._pending.append(out.detach().float().cpu())

    def _absorb(self, start: int) -> None:
        """Write captured features: the block starts at position ``start``."""
        for block in self._pending:
            self.feats[:, start + 1 : start + 1 + block.shape[1]] = block
            start += block.shape[1]
        self._pending.clear()

    def commit_probs(self, p: torch.Tensor, n: int) -> None:
        # called right after the prefill (n == 0) and after every verification forward (which fed from n - 1)
        self._absorb(-1 if n == 0 else n - 1)

    def propose(self, tokens: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = tokens.shape[0]
        if k == 0:
            return torch.zeros(b, 0, dtype=torch.long), None
        rep = self.rows // b
        seq = tokens[:, :n].repeat(rep, 1)  # x_0 .. x_{n-1}
        feats = self.feats[:, :n].clone()  # f_{-1} .. f_{n-2} (known target features)
        emb_w = self.adapter.draft_embeddings()
        drafts, qs = [], []
        with torch.no_grad():
            for _ in range(k):
                t = seq.shape[1]
                pos = torch.arange(t)
                pred = self.head(feats.to(emb_w.device), emb_w[seq.to(emb_w.device)], pos)[:, -1]  # f̂_{t-1}
                q = self.adapter.target_probs(self.adapter.feature_logits(pred).float()[:, None], self.sampling)[:, 0].cpu()
                d = q.argmax(-1) if self.sampling.greedy else torch.multinomial(q, 1, generator=self.generator).squeeze(-1)
                drafts.append(d)
                qs.append(q)
                seq = torch.cat([seq, d.repeat(rep)[:, None]], dim=1)
                feats = torch.cat([feats, pred.float().cpu()[:, None]], dim=1)
        return torch.stack(drafts, 1), torch.stack(qs, 1)

    def close(self) -> None:
        hook = getattr(self, "_hook", None)
        if hook is not None:
            hook.remove()
            self._hook = None


def load_drafter(path: str | Path, adapter: ARGenAdapter) -> EagleDrafter:
    """A drafter directory (``drafter.json`` + ``drafter.safetensors``), or ``"default"`` for the model's own."""
    _check(adapter)
    if str(path) == "default":
        path = getattr(adapter, "drafter_path", None)
        if path is None:
            raise UnsupportedModelError("This model ships no draft head: pass drafter=<dir> (train one with the recipe).")
    path = Path(path)
    if not (path / "drafter.safetensors").is_file():
        raise UnsupportedModelError(f"No drafter.safetensors in {path}.")
    head = EagleHead(adapter)
    head.load_state_dict(load_file(str(path / "drafter.safetensors")))
    return EagleDrafter(head.to(adapter.draft_embeddings().device))


def save_drafter(head: EagleHead, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(path / "drafter.safetensors"))
    (path / "drafter.json").write_text(json.dumps({"type": "eagle-1", **(meta or {})}, indent=2))


@register
@dataclass
class EagleSD(DecodeAccelerator):
    """Strict speculative decoding with a trained EAGLE-style draft head (lossless)."""

    name = "eagle_sd"
    requires = ("draft_head",)
    drafter: str = "default"
    window: int = 16

    def validate(self) -> None:
        _check_window("eagle_sd", self.window)
        if not isinstance(self.drafter, str) or not self.drafter:
            raise ConfigError("eagle_sd: drafter must be a directory or 'default' (the model's shipped head).")

    def decode(self, adapter, conditions, sampling, generator, callback=None, progress=True):  # type: ignore[override]
        drafter = load_drafter(self.drafter, adapter)
        return speculative_decode(adapter, conditions, sampling, drafter, StrictRule(), self.window, generator, callback, progress)
