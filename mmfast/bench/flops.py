"""FLOP counts for the ideal speed-up beside the measured one (matmuls only; 2 FLOPs per multiply-add).

:func:`prefill_flops` counts a prefill from the prompt length, or layer by layer from the records the prefill
stage writes (``stats["prefill_layers"]``: tokens each layer processed, tokens its attention ran among, probe
rows), so methods that drop or route tokens inside the LM are counted without the benchmark knowing them.
"""

from __future__ import annotations

from typing import Any


def transformer_flops(
    n: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int, gated: bool, causal: bool
) -> float:
    """Forward FLOPs of ``layers`` transformer blocks on ``n`` tokens (matmuls only; 2 FLOPs per MAC)."""
    proj = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o and k, v
    mlp = hidden * intermediate * (3 if gated else 2)
    attn = 2 * n * n * heads * head_dim * (0.5 if causal else 1.0)  # QK^T and AV (2 matmuls, MAC=2 flops → x2 / 2)
    return layers * (2 * n * (proj + mlp) + 2 * attn)


def lm_flops(text_config: Any, n: int) -> float:
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    return transformer_flops(
        n, text_config.hidden_size, text_config.intermediate_size, text_config.num_hidden_layers, heads, kv, head_dim,
        gated=True, causal=True,
    )


def vision_flops(vision_config: Any, crops: int) -> float:
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    heads = vision_config.num_attention_heads
    return crops * transformer_flops(
        tokens, vision_config.hidden_size, vision_config.intermediate_size, vision_config.num_hidden_layers, heads,
        heads, vision_config.hidden_size // heads, gated=False, causal=False,
    )




def _lm_dims(tc: Any) -> tuple[int, int, int, int]:
    heads = tc.num_attention_heads
    return heads, getattr(tc, "num_key_value_heads", None) or heads, getattr(tc, "head_dim", None) or tc.hidden_size // heads, tc.hidden_size


def lm_prefill_flops(text_config: Any, n: int, layers: list[dict[str, int]] | None = None) -> float:
    """LM prefill FLOPs of an ``n``-token prompt; with per-layer ``layers`` records (``tokens``, ``attended``,
    ``probe_rows``): projections and MLP over each layer's tokens, causal attention among its attended tokens, and
    the probe (queries of the probe rows, keys of every token, their logits)."""
    if not layers:
        return lm_flops(text_config, n)
    heads, kv, hd, hidden = _lm_dims(text_config)
    proj = hidden * heads * hd * 2 + hidden * kv * hd * 2
    mlp = hidden * text_config.intermediate_size * 3
    total = 0.0
    for rec in layers:
        t, p, r = rec["tokens"], rec["attended"], rec.get("probe_rows", 0)
        total += 2 * t * (proj + mlp) + 2 * p * p * heads * hd
        if r:
            total += 2 * r * t * heads * hd + 2 * t * hidden * kv * hd + 2 * r * hidden * heads * hd
    return total


def prefill_flops(adapter: Any, stats: dict[str, Any]) -> float:
    """Prefill FLOPs of one pipeline call: the vision tower over its crops / frames plus the LLM over the prompt."""
    return vision_flops(adapter.config.vision_config, stats["vision_crops"]) + lm_prefill_flops(
        adapter.text_config, stats["prompt_tokens"], stats.get("prefill_layers")
    )
