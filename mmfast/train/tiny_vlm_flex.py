"""tiny-vlm-flex: tiny-vlm fine-tuned with a TokenFLEX projector (``mmfast zoo train tiny-vlm-flex``).

Start: the shipped tiny-vlm (tower, projector, language model). Added: a :class:`~mmfast.accel.tokenflex.FlexProjector`
(SwiGLU feature weighting, residual, W_down = 0 at start). Trained: the flex projector (LR 2e-3), the projector
(the "LM projection", 3e-4) and the language model (2e-4); the tower stays frozen. Every training sample draws its
visual-token count independently (TokenFLEX's stochastic dynamic-token training; the paper samples from
{64, 144, 256} tokens of a ~27 x 27 grid):

* images: pooled crop side n uniform over {2, 3, 4, 5, 6} of each 6 x 6 crop (base view + 4 tiles: 24 to 192
  visual tokens with the tiles' row newlines). ``keep`` 0.5 / 0.25 / 0.125 pick n = 4 / 3 / 2;
* videos: per-frame side uniform over {1, 2, 3} of the native 3 x 3 pooled frame (n = 2 / 2 / 1 for the same
  keeps).

n = 6 (images) and n = 3 (videos) run the checkpoint's own path (no pooling, no feature weighting), so the saved
model's plain ``from_pretrained`` path is the full-count model and keeps being trained. Loss: answers (weight 1)
and dense descriptions (0.5) of multi-turn sequences, as tiny-vlm's joint stage; 8 images + 2 clips per step.

Output: a normal LLaVA-OneVision checkpoint + processor (fp16) and ``tokenflex.safetensors`` beside it, which the
``tokenflex`` accelerator loads. ``work_dir`` holds a resumable checkpoint (model, flex projector, optimizer,
state), ``log.jsonl`` (losses; teacher-forced held-out exact match at several counts) and ``curves.png``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfast.errors import ConfigError, MMFastError
from mmfast.train import data as D
from mmfast.train import tiny_vlm as T

if TYPE_CHECKING:
    import torch

    from mmfast.accel.tokenflex import FlexProjector

IMAGE_SIDES: tuple[int, ...] = (2, 3, 4, 5, 6)
VIDEO_SIDES: tuple[int, ...] = (1, 2, 3)
IMAGE_SIDE = T.VIEW_GRID  # native crop side
VIDEO_SIDE = math.ceil(T.VIEW_GRID / 2)  # native pooled frame side


@dataclass
class FlexRecipe:
    """Every knob of :func:`train` (defaults: the shipped model)."""

    steps: int = 1400
    image_batch: int = 8
    video_batch: int = 2
    qas_per_image: int = 10
    qas_per_clip: int = 10
    desc_first: float = 0.2
    flex_hidden: int = 256
    flex_lr: float = 2e-3
    projector_lr: float = 3e-4
    lm_lr: float = 2e-4
    weight_decay: float = 0.05
    warmup: int = 50
    clip_norm: float = 1.0
    desc_weight: float = 0.5
    seed: int = 0
    data_offset: int = 1_000_000  # training samples after the ones tiny-vlm saw
    eval_every: int = 200
    eval_images: int = 40
    eval_clips: int = 16
    eval_seed: int = 1
    checkpoint_every_s: float = 180.0
    max_minutes: float = 60.0  # stop (and save) after this much training time
    base: str = ""  # tiny-vlm checkpoint directory (default: the zoo's; "random-tiny": an untrained tiny-size one)

    @classmethod
    def quick(cls) -> FlexRecipe:
        return cls(steps=4, image_batch=2, video_batch=1, qas_per_image=3, qas_per_clip=3, warmup=1, eval_every=4,
                   eval_images=3, eval_clips=2, flex_hidden=16, base="random-tiny")


# ---------------------------------------------------------------------------------------------------------------
# fast features (equal to what the tokenflex accelerator computes for 96 px images / 16-frame clips; tested)
# ---------------------------------------------------------------------------------------------------------------
def flex_image_features(model: Any, flex: FlexProjector, tower: torch.Tensor, sides: list[int]) -> list[torch.Tensor]:
    """tower (B, 5, 36, Dv) frozen features of the 5 crops -> per image (N_b, D): every crop pooled to its image's
    side n, packed as the model packs them (base view, then the 2 x 2 tiles with row newlines; n = 6: the
    checkpoint's own path)."""
    from mmfast.accel.tokenflex import pool_grid

    m = model.model
    out: list[Any] = [None] * len(sides)
    for n in sorted(set(sides)):
        idx = [i for i, s in enumerate(sides) if s == n]
        h = tower[idx].flatten(0, 1)
        f = m.multi_modal_projector(h if n == IMAGE_SIDE else flex(pool_grid(h, n)).flatten(1, 2))
        feats = T.pack_views(model, f.view(len(idx), T.N_VIEWS, n * n, -1))
        for j, i in enumerate(idx):
            out[i] = feats[j]
    return out


def flex_video_features(model: Any, flex: FlexProjector, tower: torch.Tensor, frames: int,
                        sides: list[int]) -> list[torch.Tensor]:
    """tower (B*T, 36, Dv) -> per clip (T * n^2 + 1, D); n = 3 is the checkpoint's own 2x2 bilinear path."""
    import torch

    from mmfast.accel.tokenflex import pool_grid

    m = model.model
    tower = tower.view(len(sides), frames, *tower.shape[1:])
    out: list[Any] = [None] * len(sides)
    for n in sorted(set(sides)):
        idx = [i for i, s in enumerate(sides) if s == n]
        h = tower[idx].flatten(0, 1)
        if n == VIDEO_SIDE:
            f = m.apply_pooling(m.multi_modal_projector(h))
        else:
            f = m.multi_modal_projector(flex(pool_grid(h, n)).flatten(1, 2))
        f = f.reshape(len(idx), -1, f.shape[-1])
        newline = m.image_newline.to(f.dtype).view(1, 1, -1).expand(len(idx), 1, -1)
        f = torch.cat([f, newline], dim=1)
        for j, i in enumerate(idx):
            out[i] = f[j]
    return out


def image_tokens(n: int) -> int:
    return n * n + 2 * n * (2 * n + 1)


def video_tokens(n: int, frames: int = T.NUM_FRAMES) -> int:
    return frames * n * n + 1


# ---------------------------------------------------------------------------------------------------------------
# trainer
# ---------------------------------------------------------------------------------------------------------------
class _FlexTrainer:
    def __init__(self, recipe: FlexRecipe, work_dir: Path, log: Callable[[str], None] = print, progress: bool = True,
                 base_model: Any = None, processor: Any = None):
        import torch

        from mmfast.accel.tokenflex import FlexProjector

        self.r = recipe
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.say, self.progress = log, progress
        if base_model is None and recipe.base == "random-tiny":  # smoke runs need no trained tiny-vlm
            base_model, processor = T.build_model("tiny", seed=recipe.seed), T.build_processor()
        if base_model is None:
            from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

            from mmfast.zoo import zoo_path

            base = Path(recipe.base) if recipe.base else zoo_path("tiny-vlm")
            base_model = LlavaOnevisionForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
            processor = AutoProcessor.from_pretrained(base)
        self.model = base_model.float().train()
        self.processor = processor
        self.builder = T.SequenceBuilder(processor.tokenizer)
        torch.manual_seed(recipe.seed)
        self.flex = FlexProjector(self.model.config.vision_config.hidden_size, recipe.flex_hidden,
                                  counts=IMAGE_SIDES).train()
        self.step, self.elapsed, self.cpu_elapsed = 0, 0.0, 0.0
        self.log_path = self.dir / "log.jsonl"
        self.rng = np.random.default_rng(recipe.seed)
        self._ev: T._EvalSet | None = None
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        import torch

        m, r = self.model, self.r
        for p in m.parameters():
            p.requires_grad_(False)
        groups = []
        for params, lr in (
            (list(self.flex.parameters()), r.flex_lr),
            ([*m.model.multi_modal_projector.parameters(), m.model.image_newline], r.projector_lr),
            ([*m.model.language_model.parameters(), *m.lm_head.parameters()], r.lm_lr),
        ):
            for p in params:
                p.requires_grad_(True)
            groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "base_lr": lr,
                           "weight_decay": r.weight_decay})
            groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "base_lr": lr, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.98))

    # ---- checkpoint --------------------------------------------------------------------------------------------
    def save(self) -> None:
        state = {"step": self.step, "elapsed": self.elapsed, "cpu_elapsed": self.cpu_elapsed, "recipe": asdict(self.r),
                 "rng": self.rng.bit_generator.state}
        T.save_checkpoint(self.dir / "ckpt", {"model": self.model.state_dict(), "flex": self.flex.state_dict(),
                                              "optim": T._optim_tensors(self.opt)}, state)

    def load(self) -> bool:
        ck = self.dir / "ckpt"
        if not (ck / "state.json").is_file():
            return False
        state = json.loads((ck / "state.json").read_text())
        if state["recipe"]["flex_hidden"] != self.r.flex_hidden:
            raise ConfigError(f"{ck} holds a run with another flex_hidden; use another --work-dir")
        self.model.load_state_dict(T._load_tensors(ck / "model.safetensors"))
        self.flex.load_state_dict(T._load_tensors(ck / "flex.safetensors"))
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.cpu_elapsed = float(state.get("cpu_elapsed", 0.0))
        self.rng.bit_generator.state = state["rng"]
        self._new_optimizer()
        if self.step > 0:
            T._load_optim(self.opt, T._load_tensors(ck / "optim.safetensors"))
        if self.log_path.is_file():
            keep = [x for x in self.log_path.read_text().splitlines() if json.loads(x)["step"] <= self.step]
            self.log_path.write_text("".join(x + "\n" for x in keep))
        return True

    def _log(self, rec: dict[str, Any]) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"step": self.step, "time_s": round(self.elapsed, 1), **rec}) + "\n")

    # ---- data --------------------------------------------------------------------------------------------------
    def _turns(self, s: Any, prompt: str, kind: str, index: int) -> list[tuple[str, str]]:
        rng = D.sample_rng(kind, "train", self.r.seed + 7919, index)
        if rng.random() < self.r.desc_first or not s.questions:
            return [(prompt, s.description)]
        return [(qa.question, qa.answer) for qa in s.questions] + [(prompt, s.description)]

    def _loss(self, ids: torch.Tensor, grp: torch.Tensor, feats: list[torch.Tensor], token_id: int
              ) -> tuple[torch.Tensor, dict[str, float]]:
        import torch
        import torch.nn.functional as F

        h = T._lm_hidden(self.model, T._embed(self.model, ids, torch.cat(feats), token_id))
        tgt = torch.roll(ids, -1, dims=1)
        total, stats = torch.zeros(()), {}
        for g, w, name in ((T.G_QA, 1.0, "qa"), (T.G_DESC, self.r.desc_weight, "desc")):
            m = grp == g
            if bool(m.any()):
                logits = self.model.lm_head(h[m]).float()
                loss = F.cross_entropy(logits, tgt[m])
                total = total + w * loss
                stats[f"loss_{name}"] = float(loss.detach())
        return total, stats

    def _train_step(self) -> dict[str, float]:
        import torch

        r, step, m = self.r, self.step, self.model
        stats: dict[str, float] = {}
        loss = torch.zeros(())
        with torch.autocast("cpu", torch.bfloat16):
            if r.image_batch:
                start = r.data_offset + step * r.image_batch
                samples = [D.image_sample("train", r.seed, i, k=r.qas_per_image) for i in range(start, start + r.image_batch)]
                sides = [int(x) for x in self.rng.choice(IMAGE_SIDES, size=len(samples))]
                seqs = [self.builder.encode(self._turns(s, T.CAPTION_PROMPT, "image", start + j), "image",
                                            image_tokens(n)) for j, (s, n) in enumerate(zip(samples, sides))]
                ids, grp = T._collate(seqs, self.builder.pad)
                pix = T.image_pixels(np.stack([s.image for s in samples]))
                tower = T._tower(m, pix.flatten(0, 1), grad=False).detach().view(*pix.shape[:2], -1, m.config.vision_config.hidden_size)
                li, s = self._loss(ids, grp, flex_image_features(m, self.flex, tower, sides), m.config.image_token_index)
                loss = loss + li
                stats.update({f"img_{k}": v for k, v in s.items()})
            if r.video_batch:
                start = r.data_offset + step * r.video_batch
                clips = [D.clip_sample("train", r.seed, i, num_frames=T.NUM_FRAMES, k=r.qas_per_clip)
                         for i in range(start, start + r.video_batch)]
                sides = [int(x) for x in self.rng.choice(VIDEO_SIDES, size=len(clips))]
                seqs = [self.builder.encode(self._turns(c, T.VIDEO_CAPTION_PROMPT, "video", start + j), "video",
                                            video_tokens(n)) for j, (c, n) in enumerate(zip(clips, sides))]
                ids, grp = T._collate(seqs, self.builder.pad)
                pix = T.video_pixels(np.stack([c.frames for c in clips]))
                tower = T._tower(m, pix.flatten(0, 1), grad=False).detach()
                feats = flex_video_features(m, self.flex, tower, T.NUM_FRAMES, sides)
                lv, s = self._loss(ids, grp, feats, m.config.video_token_index)
                loss = loss + lv
                stats.update({f"vid_{k}": v for k, v in s.items()})
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, r.clip_norm))
        f = T._lr_factor(step, r.steps, r.warmup)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        stats["loss"] = float(loss.detach())
        return stats

    # ---- evaluation (teacher-forced exact match, one question per prompt) ----------------------------------------
    def evaluate(self, image_sides: tuple[int, ...] = (6, 3, 2), video_sides: tuple[int, ...] = (3, 2),
                 batch: int = 24) -> dict[str, float]:
        import torch

        r = self.r
        if self._ev is None:
            self._ev = T._EvalSet(D.image_dataset("heldout", r.eval_images, seed=r.eval_seed),
                                  D.video_dataset("heldout", r.eval_clips, seed=r.eval_seed, num_frames=T.NUM_FRAMES))
        self.model.eval()
        self.flex.eval()
        res: dict[str, float] = {}
        cfg = self.model.config
        for modality, items, sides in (("image", self._ev.images, image_sides), ("video", self._ev.clips, video_sides)):
            jobs = [(k, qa) for k, it in enumerate(items) for qa in it.questions]
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                stacked = np.stack([it.image if modality == "image" else it.frames for it in items])
                pix = T.image_pixels(stacked) if modality == "image" else T.video_pixels(stacked)
                tower = T._tower(self.model, pix.flatten(0, 1), grad=False)
                if modality == "image":
                    tower = tower.view(*pix.shape[:2], *tower.shape[1:])
                for n in sides:
                    if modality == "image":
                        per = flex_image_features(self.model, self.flex, tower, [n] * len(items))
                        n_vis, tid = image_tokens(n), cfg.image_token_index
                    else:
                        per = flex_video_features(self.model, self.flex, tower, T.NUM_FRAMES, [n] * len(items))
                        n_vis, tid = video_tokens(n), cfg.video_token_index
                    hits = []
                    for s in range(0, len(jobs), batch):
                        chunk = jobs[s:s + batch]
                        seqs = [self.builder.encode([(qa.question, qa.answer)], modality, n_vis) for _, qa in chunk]
                        ids, grp = T._collate(seqs, self.builder.pad)
                        feats = torch.cat([per[k] for k, _ in chunk])
                        pred = self.model.lm_head(T._lm_hidden(self.model, T._embed(self.model, ids, feats, tid)))
                        pred = pred.argmax(-1)
                        tgt = torch.roll(ids, -1, dims=1)
                        hits += [bool((pred[b][grp[b] > 0] == tgt[b][grp[b] > 0]).all()) for b in range(len(chunk))]
                    res[f"{modality}_n{n}"] = float(np.mean(hits))
        self.model.train()
        self.flex.train()
        return res

    def run(self, max_steps: int | None = None) -> None:
        from tqdm.auto import tqdm

        r = self.r
        total = r.steps if max_steps is None else min(r.steps, max_steps)
        if self.step == 0:
            self._log({"eval": self.evaluate()})
        bar = tqdm(total=total, initial=self.step, desc="tiny-vlm-flex", disable=not self.progress, dynamic_ncols=True)
        last = time.perf_counter()
        while self.step < total and self.elapsed < r.max_minutes * 60:
            t0, c0 = time.perf_counter(), time.process_time()
            stats = self._train_step()
            self.step += 1
            self.elapsed += time.perf_counter() - t0
            self.cpu_elapsed += time.process_time() - c0
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}")
            if self.step % 10 == 0:
                self._log({"train": stats})
            if self.step % r.eval_every == 0 or self.step == total:
                res = self.evaluate()
                self._log({"eval": res})
                bar.write(f"[{self.step}/{total}] " + " ".join(f"{k}={v:.3f}" for k, v in res.items()))
            if time.perf_counter() - last > r.checkpoint_every_s:
                self.save()
                last = time.perf_counter()
        bar.close()
        self.save()


def save_flex_model(model: Any, flex: FlexProjector, processor: Any, out_dir: str | Path) -> Path:
    """The fine-tuned checkpoint (fp16, like tiny-vlm) + processor + ``tokenflex.safetensors`` (fp32)."""
    out = T.save_model(model, processor, out_dir)
    flex.save(out)
    return out


def train(out_dir: str | Path | None = None, work_dir: str | Path = "tiny-vlm-flex-train", resume: bool = False,
          steps: int | None = None, quick: bool = False, recipe: FlexRecipe | None = None,
          log: Callable[[str], None] = print, progress: bool = True, base_model: Any = None,
          processor: Any = None) -> Path:
    """Run the recipe; write the model into ``out_dir`` (default ``work_dir/model``) and return it."""
    work = Path(work_dir)
    r = recipe if recipe is not None else (FlexRecipe.quick() if quick else FlexRecipe())
    if not resume and (work / "ckpt").exists():
        raise MMFastError(f"{work} already holds a training run: pass --resume to continue it, or another --work-dir")
    tr = _FlexTrainer(r, work, log=log, progress=progress, base_model=base_model, processor=processor)
    if resume and tr.load():
        log(f"resumed {work}: step {tr.step}, {tr.elapsed / 60:.1f} min trained so far")
    elif not resume:
        (work / "log.jsonl").unlink(missing_ok=True)
    tr.run(max_steps=steps)
    out = Path(out_dir) if out_dir is not None else work / "model"
    save_flex_model(tr.model, tr.flex.eval(), tr.processor, out)
    summary = {"recipe": asdict(r), "steps": tr.step, "train_minutes": round(tr.elapsed / 60, 1),
               "cpu_minutes": round(tr.cpu_elapsed / 60, 1)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    try:
        plot_curves(work / "log.jsonl", work / "curves.png")
    except ImportError:
        pass
    log(f"tiny-vlm-flex written to {out} ({tr.elapsed / 60:.1f} min of training)")
    return out


def plot_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """Held-out teacher-forced exact match per visual-token count vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(log_path).read_text().splitlines() if x.strip()]
    evals = {rec["step"]: rec["eval"] for rec in recs if "eval" in rec}
    steps = sorted(evals)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({k for e in evals.values() for k in e}):
        ax.plot(steps, [evals[s].get(key, np.nan) for s in steps], "-" if key.startswith("image") else "--", label=key)
    ax.set(title="tiny-vlm-flex: held-out exact match per pooled side n", xlabel="step", ylabel="accuracy",
           ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
