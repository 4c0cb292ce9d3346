"""Recipe: the EAGLE-style draft head of tiny-ar (``mmfast zoo train tiny-ar-drafter``).

The head (:class:`mmfast.accel.eagle.EagleHead`, one LlamaGen block) learns to predict tiny-ar's own features
on real digit token sequences: the generator's training digits (only those), augmented with small affine
jitter, encoded by tiny-ar's VQ. Loss as in EAGLE / LANTERN's drafter recipe: SmoothL1 on the features
+ 0.1 x cross-entropy through the frozen output layer; 10% of rows use the null class so the head also drafts
the unconditional CFG rows; small feature noise for robustness to its own predictions. A few minutes on CPU.
Saved beside the model in ``mmfast/zoo/tiny_ar/drafter/`` and used by ``eagle_sd()`` and ``lantern(drafter=...)``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmfast.accel.eagle import EagleHead, save_drafter


def drafter_loss(head: EagleHead, gpt: Any, tokens: torch.Tensor, cond: torch.Tensor, feat_noise: float = 0.0) -> torch.Tensor:
    """EAGLE loss on teacher-forced real sequences: SmoothL1(f̂_j, f_j) + 0.1 CE(output(f̂_j), x_{j+1}).

    tokens (B, N) image tokens; cond (B,) labels (use the null class for some rows to learn unconditional drafts).
    """
    feats: list[torch.Tensor] = []
    hook = gpt.norm.register_forward_hook(lambda _m, _i, out: feats.append(out))
    with torch.no_grad():
        gpt(tokens[:, :-1], cond, drop=torch.zeros(len(cond), dtype=torch.bool))  # features at positions -1..N-2
    hook.remove()
    f = feats[0].float()  # (B, N, d): f[:, j] = feature at position j - 1
    inp = f[:, :-1] + feat_noise * torch.randn_like(f[:, :-1])
    pred = head(inp, gpt.tok_embeddings(tokens[:, :-1]).float(), torch.arange(tokens.shape[1] - 1, device=tokens.device))
    target = f[:, 1:]  # feature at position j predicts x_{j+1}
    logits = gpt.output(pred).float()
    return F.smooth_l1_loss(pred, target) + 0.1 * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _jitter(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random rotation / scale / shift of (B, C, H, W) images (same kind of jitter as a digit scanner)."""
    b = images.shape[0]
    ang = (torch.rand(b, generator=gen) - 0.5) * math.radians(20)
    scale = 1 + (torch.rand(b, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def train_drafter(
    model: str | Path = "tiny-ar",
    out_dir: str | Path | None = None,
    steps: int = 1500,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the draft head of ``model`` (zoo name or directory); returns a small report."""
    from mmfast import zoo
    from mmfast.metrics import digit_splits, digits_to_images
    from mmfast.models.llamagen import LlamaGenAdapter

    path = zoo.zoo_path(str(model)) if zoo.is_zoo_name(str(model)) else Path(model)
    adapter = LlamaGenAdapter.from_pretrained(path)
    gpt, vq = adapter.gpt.eval(), adapter.vq.eval()
    for prm in [*gpt.parameters(), *vq.parameters()]:
        prm.requires_grad_(False)
    x, y = digit_splits(seed=0)["generator_train"]
    size = adapter.grid[0] * 2 ** (len(vq.config.encoder_ch_mult) - 1)  # token grid x VQ downsampling
    images = digits_to_images(x, size=size, rgb=vq.config.in_channels == 3)
    images = images * 2 - 1  # VQ input range [-1, 1]
    labels = torch.as_tensor(y, dtype=torch.long)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = EagleHead(adapter)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    t0, losses = time.perf_counter(), []
    for _ in tqdm(range(steps), desc="tiny-ar drafter", disable=not progress):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        with torch.no_grad():
            tokens = vq.encode(_jitter(images[idx], gen)).flatten(1)
        cond = labels[idx].clone()
        cond[torch.rand(batch, generator=gen) < 0.1] = gpt.config.num_classes  # null class: unconditional rows
        loss = drafter_loss(head, gpt, tokens, cond, feat_noise=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    report = {"steps": steps, "batch": batch, "train_s": round(time.perf_counter() - t0, 1),
              "final_loss": sum(losses[-50:]) / min(50, len(losses))}
    save_drafter(head, out_dir or path / "drafter", meta=report)
    return report
