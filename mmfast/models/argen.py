"""ARGenAdapter: the one interface every AR image generator exposes to the decoders.

A decoder (the baseline loop in :mod:`mmfast.decoding`, or the speculative loop of SJD / LANTERN / GSD /
EAGLE in :mod:`mmfast.accel.speculative`) only needs:

* ``session = adapter.session(conditions, sampling)``: conditioning prefilled into a KV cache (batch
  doubled for classifier-free guidance);
* ``session.prefill() -> raw[B', 1, V]``: logits for image position 0;
* ``session.forward(tokens[B, L], positions[L]) -> raw[B', L, V]``: feed image tokens at absolute image
  positions; ``raw[:, j]`` predicts the token after ``positions[j]``;
* ``session.truncate(n)``: keep the conditioning plus the first ``n`` fed image tokens;
* ``adapter.target_probs(raw, sampling) -> probs[B, L, V]``: THE processed target distribution
  (CFG → temperature → top-k → top-p → softmax) that the baseline and every accelerated decoder share;
* ``adapter.codebook_embeddings() -> [V, D]`` and ``adapter.decode(tokens) -> images``.

``B' = 2B`` when ``guidance_scale > 1`` (conditional rows first, unconditional rows second), else ``B``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from mmfast.errors import ConfigError, InvalidInputError, UnsupportedModelError


@dataclass
class Sampling:
    """How the next token is drawn. ``temperature=0`` means greedy (argmax)."""

    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 0 or math.isnan(self.guidance_scale):
            raise ConfigError(f"guidance_scale must be a number >= 0, got {self.guidance_scale!r}.")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}.")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}.")

    @property
    def cfg(self) -> bool:
        return self.guidance_scale > 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def cfg_combine(raw: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + s * (cond - uncond)`` over the doubled batch (cond rows first): (2B, ..., V) → (B, ..., V)."""
    cond, uncond = raw.chunk(2, dim=0)
    return uncond + (cond - uncond) * scale


def warp_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p, with transformers' warper semantics (filtered logits = -inf).

    Runs in the dtype of ``logits`` (as transformers' warpers do).
    """
    if sampling.temperature not in (0, 1):
        logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - sampling.top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def target_probs(raw: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The processed target distribution: CFG → temperature → top-k → top-p → softmax (one-hot if greedy).

    Every step runs in the dtype of ``raw`` and only the probabilities are cast to float32: transformers'
    processors work on the scores in the dtype they get, so a session returns ``raw`` in the dtype its reference
    loop processes (Janus' image loop: the model dtype, e.g. bf16; ``GenerationMixin`` loops: float32). Upcasting
    earlier changes bf16 distributions by up to ~1e-2 (CFG / temperature / softmax round differently). (Tokens can
    still differ from a bf16 reference on rare draws: ``torch.multinomial`` rounds ``p / Exp(1)`` in p's dtype.)

    Args:
        raw: (B', L, V) or (B', V) logits from a session (``B' = 2B`` under CFG).
    Returns:
        (B, L, V) / (B, V) float32 probabilities.
    """
    logits = cfg_combine(raw, sampling.guidance_scale) if sampling.cfg else raw
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = warp_logits(logits, sampling).softmax(dim=-1)
    if probs.dtype in (torch.float16, torch.bfloat16):
        # a half-precision softmax sums to 1 only within ~1e-3: renormalise in float32 so acceptance / residual
        # maths get a proper distribution (torch.multinomial draws argmax p / Exp(1): scaling p changes nothing)
        probs = probs.float()
        return probs / probs.sum(dim=-1, keepdim=True)
    return probs.float()


class ARGenSession:
    """One generation request's KV cache. Subclasses implement prefill / forward / truncate."""

    batch: int  # B (rows the user asked for)
    length: int  # image tokens currently held in the cache

    def prefill(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def truncate(self, n: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class ARGenAdapter:
    """Family-agnostic part of an AR image generator adapter."""

    kind: ClassVar[str] = "argen"
    family: ClassVar[str] = ""
    #: what the family offers beyond the basics: "draft_head" (EAGLE-style draft heads on its features)
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: "class" (labels) or "text" (prompts)
    conditioning: ClassVar[str] = "class"
    string_prompts: ClassVar[bool] = False  # prompts must be strings (tokenized by the adapter's processor)
    #: "raster" (one token per step: :func:`mmfast.decoding.ar_decode`) or "scales" (VAR: ``scale_decode``)
    order: ClassVar[str] = "raster"

    grid: tuple[int, int]  # (rows, cols) of the image token grid, raster order
    codebook_size: int
    drafter_path: Any = None  # directory of a shipped draft head, if any

    def __init__(self) -> None:
        self.decode_methods: list[Any] = []

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    # accelerators of the decode stage register here (see mmfast.accel.base)
    def add_accelerator(self, acc: Any) -> None:
        self.decode_methods.append(acc)

    def remove_accelerator(self, acc: Any) -> None:
        while acc in self.decode_methods:
            self.decode_methods.remove(acc)

    def session(self, conditions: list[Any], sampling: Sampling) -> ARGenSession:  # pragma: no cover
        raise NotImplementedError

    def target_probs(self, raw: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        return target_probs(raw, sampling)

    def codebook_embeddings(self) -> torch.Tensor:  # pragma: no cover - abstract
        """(V, D) latent vectors of the image codebook (for latent-neighbour methods)."""
        raise NotImplementedError

    def token_embeddings(self) -> torch.Tensor:  # pragma: no cover - abstract
        """(V, D) the language model's input embeddings of the image tokens (GSD groups tokens by these)."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:  # pragma: no cover - abstract
        """(B, N) image tokens → B PIL images."""
        raise NotImplementedError

    def parse_conditions(self, conditions: Any) -> list[Any]:
        """Validate user conditions (labels or prompts) into a list; adapters override for their vocabulary."""
        if conditions is None:
            raise InvalidInputError(f"{self.family}: pass {'labels' if self.conditioning == 'class' else 'prompt'}.")
        out = list(conditions) if isinstance(conditions, (list, tuple)) else [conditions]
        if self.string_prompts and (not out or not all(isinstance(p, str) for p in out)):
            raise InvalidInputError(f"{self.family}: prompt must be a string or a non-empty list of strings.")
        return out


_NUMBER_WORDS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen".split()
    )
}


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def class_label(c: Any, num_classes: int, id2label: Sequence[str] | None = None) -> int:
    """One class condition -> its id: an int in [0, num_classes), or a prompt naming it through ``id2label``
    ("7", "digit 7", "seven"); anything else raises :class:`InvalidInputError`."""
    n = num_classes
    if torch.is_tensor(c) and c.numel() == 1:
        c = c.item()
    if isinstance(c, str):
        text = _words(c)
        names = [_words(x) for x in id2label or []]
        if text in names:
            return names.index(text)
        hits = sorted((len(x), i) for i, x in enumerate(names) if x and re.search(rf"\b{re.escape(x)}\b", text))
        if hits and (len(hits) == 1 or hits[-1][0] > hits[-2][0]):
            return hits[-1][1]  # the longest label name contained in the prompt
        nums = [int(w) if w.isdigit() else _NUMBER_WORDS[w] for w in text.split() if w.isdigit() or w in _NUMBER_WORDS]
        if len(nums) != 1:
            known = f" Known labels: {', '.join(list(id2label)[:20])}." if id2label else ""
            raise InvalidInputError(f"cannot map prompt {c!r} to one of {n} classes.{known}")
        c = nums[0]
    if isinstance(c, numbers.Integral) and not isinstance(c, bool):
        c = int(c)  # numpy integers too
    if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < n:
        raise InvalidInputError(f"class labels are integers in [0, {n}) (or label names / prompts), got {c!r}.")
    return c


def load_hf_generator(path_or_id: str | Path, model_type: str, model_cls: str, dtype: torch.dtype | str | None,
                      device: Any) -> tuple[Any, Any]:
    """Model + processor of an HF text-to-image checkpoint through transformers' ``from_pretrained``
    (``dtype`` defaults to float32); a missing / wrong-type checkpoint raises ``UnsupportedModelError``."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    name = str(path_or_id)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"Could not load {name!r}: {e}") from e
    if config.model_type != model_type:
        raise UnsupportedModelError(
            f"{name!r} is a {config.model_type!r} model; this adapter needs a {model_type!r} checkpoint."
        )
    try:
        model = getattr(transformers, model_cls).from_pretrained(name, dtype=dtype or torch.float32)
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"Could not load {name!r}: {e}") from e
    return (model.to(device) if device is not None else model), processor


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) float in [-1, 1] → PIL RGB images."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
