"""tiny-vlm-scan: tiny-vlm fine-tuned to read videos through VideoScan's semantic carriers
(``mmfast zoo train tiny-vlm-scan``).

VideoScan (Li et al., arXiv 2503.09387) streams a video frame by frame: each frame's visual tokens F_t are followed by
its carrier c_t = mean(F_t); once the frame is prefilled only the carrier's KV stays in the cache, so later frames
and the question see earlier frames only through their carriers, and positions continue over the compacted
sequence. As the paper fine-tunes its base model for this, this recipe fine-tunes tiny-vlm on exactly that view
of a clip, in one teacher-forced forward per sequence:

* the unrolled sequence ``[prefix][F_0 c_0][F_1 c_1]...[F_{T-1} c_{T-1}][newline][question, answer, ...]``;
* an attention mask that lets the tokens of frame t see the prefix, the carriers of earlier frames and frame t
  itself (causally), and every later token see the prefix, all carriers and itself (never a frame token);
* positions as the stream gives them: the tokens of frame t start at ``P + t`` (prefix plus t carriers), its
  carrier follows them, the text after the video starts at ``P + T``.

:func:`scan_sequence` builds that layout, the streaming session's ``videoscan()`` produces the same cache (tested).
Trained: the language model (LR 3e-4) and the projector + newline (1e-3); the tower stays frozen. Data: tiny-vlm's
training clips (16 frames, held 1x or 2x so the model sees 16- and 32-carrier streams), multi-turn QA + the dense
description (weight 0.5). ``work_dir`` holds a resumable checkpoint, ``log.jsonl`` (losses; held-out teacher-forced
exact match on streamed clips) and ``curves.png``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmfast.errors import MMFastError
from mmfast.train import data as D
from mmfast.train import tiny_vlm as T

if TYPE_CHECKING:
    import torch

FRAME_TOKENS = (T.VIEW_GRID // 2) ** 2  # 9 pooled tokens per 48 px frame


@dataclass
class ScanRecipe:
    """Every knob of :func:`train` (defaults: the shipped model)."""

    steps: int = 2500
    clip_batch: int = 8
    qas_per_clip: int = 10
    desc_first: float = 0.2
    hold: tuple[int, ...] = (1, 1, 2)  # frames shown this many times, cycling step by step
    lm_lr: float = 3e-4
    projector_lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    clip_norm: float = 1.0
    desc_weight: float = 0.5
    eval_every: int = 250
    eval_clips: int = 40
    eval_seed: int = 1
    seed: int = 3
    base: str = ""  # "" = the installed tiny-vlm; "random-tiny" for smoke runs
    checkpoint_every_s: float = 180.0
    max_minutes: float = 55.0

    @classmethod
    def quick(cls) -> ScanRecipe:
        return cls(steps=4, clip_batch=1, qas_per_clip=3, warmup=1, eval_every=4, eval_clips=2, base="random-tiny",
                   hold=(1,))


def scan_sequence(ids: torch.Tensor, placeholder: int, frame_feats: torch.Tensor, trailer: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VideoScan view of one sequence with a video placeholder run.

    ids: (L,) token ids whose placeholder run holds ``T * (n + 1) + len(trailer)`` placeholders (see
    :func:`scan_placeholders`); frame_feats: (T, n, D) the frames' visual tokens; trailer: (k, D) layout tokens that
    close the video (OneVision's newline). Returns ``features`` (T * (n + 1) + k, D) in placeholder order (each frame's
    tokens, then its carrier = their mean; the trailer last), ``positions`` (L,), ``region`` (L,) (-1 prefix,
    t for frame t's tokens, ``T`` for everything after the video) and ``carrier`` (L,) bool.
    """
    import torch

    t, n, d = frame_feats.shape
    feats = torch.cat([frame_feats, frame_feats.mean(1, keepdim=True)], dim=1).reshape(t * (n + 1), d)
    feats = torch.cat([feats, trailer.to(feats.dtype)])
    where = (ids == placeholder).nonzero().flatten()
    p = int(where[0])
    length = ids.shape[0]
    region = torch.full((length,), t, dtype=torch.long)
    region[:p] = -1
    carrier = torch.zeros(length, dtype=torch.bool)
    pos = torch.arange(length)
    for f in range(t):
        s = p + f * (n + 1)
        region[s : s + n + 1] = f
        carrier[s + n] = True
        pos[s : s + n + 1] = p + f + torch.arange(n + 1)  # the cache holds the prefix and f carriers
    tail = p + t * (n + 1)
    pos[tail:] = p + t + torch.arange(length - tail)
    return feats, pos, region, carrier


def scan_mask(region: torch.Tensor, carrier: torch.Tensor, valid: int, dtype: torch.dtype) -> torch.Tensor:
    """(1, L, L) additive mask: causal, and a frame's tokens visible only from that frame (carriers and the prefix
    from everywhere later). Padding rows (>= ``valid``) see only themselves."""
    import torch

    length = region.shape[0]
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    rq, rk = region[:, None], region[None, :]
    frame_key = (rk >= 0) & ~carrier[None, :] & (rk < int(region.max()))  # tokens of some frame (not carriers)
    ok = (j <= i) & (~frame_key | (rq == rk))
    ok[valid:] = False
    ok[torch.arange(length), torch.arange(length)] = True
    out = torch.zeros(length, length, dtype=dtype)
    out.masked_fill_(~ok, torch.finfo(dtype).min)
    return out[None]


def scan_placeholders(frames: int) -> int:
    return frames * (FRAME_TOKENS + 1) + 1


class _ScanTrainer:
    def __init__(self, recipe: ScanRecipe, work_dir: Path, log: Callable[[str], None] = print, progress: bool = True):
        import torch

        self.r = recipe
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.say, self.progress = log, progress
        if recipe.base == "random-tiny":
            model, processor = T.build_model("tiny", seed=recipe.seed), T.build_processor()
        else:
            from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

            from mmfast.zoo import zoo_path

            base = Path(recipe.base) if recipe.base else zoo_path("tiny-vlm")
            model = LlavaOnevisionForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
            processor = AutoProcessor.from_pretrained(base)
        self.model, self.processor = model.float().train(), processor
        self.builder = T.SequenceBuilder(processor.tokenizer)
        self.step, self.elapsed, self.cpu_elapsed = 0, 0.0, 0.0
        self.log_path = self.dir / "log.jsonl"
        self._ev: list[D.ClipSample] | None = None
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        import torch

        m, r = self.model, self.r
        for p in m.parameters():
            p.requires_grad_(False)
        groups = []
        for params, lr in (([*m.model.multi_modal_projector.parameters(), m.model.image_newline], r.projector_lr),
                           ([*m.model.language_model.parameters(), *m.lm_head.parameters()], r.lm_lr)):
            for p in params:
                p.requires_grad_(True)
            groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "base_lr": lr,
                           "weight_decay": r.weight_decay})
            groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "base_lr": lr, "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.98))

    def save(self) -> None:
        state = {"step": self.step, "elapsed": self.elapsed, "cpu_elapsed": self.cpu_elapsed, "recipe": asdict(self.r)}
        T.save_checkpoint(self.dir / "ckpt", {"model": self.model.state_dict(), "optim": T._optim_tensors(self.opt)},
                          state)

    def load(self) -> bool:
        ck = self.dir / "ckpt"
        if not (ck / "state.json").is_file():
            return False
        state = json.loads((ck / "state.json").read_text())
        self.model.load_state_dict(T._load_tensors(ck / "model.safetensors"))
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.cpu_elapsed = float(state.get("cpu_elapsed", 0.0))
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

    # ---- one batch of streamed sequences ------------------------------------------------------------------
    def _forward(self, clips: list[np.ndarray], turns: list[list[tuple[str, str]]]) -> tuple[Any, Any, Any]:
        """Logits-ready hidden states (B, L, D), next-token ids (B, L) and loss groups (B, L)."""
        import torch

        m = self.model
        frames = [int(c.shape[0]) for c in clips]
        seqs = [self.builder.encode(tt, "video", scan_placeholders(f)) for tt, f in zip(turns, frames)]
        ids, grp = T._collate(seqs, self.builder.pad)
        vid = m.config.video_token_index
        embeds, masks, positions = [], [], []
        with torch.no_grad():
            feats_all = [T.video_features(m, T.video_pixels(c[None]), tower_grad=False)[0] for c in clips]
        for b, (feats, f) in enumerate(zip(feats_all, frames)):
            frame_feats = feats[:-1].reshape(f, FRAME_TOKENS, -1)
            seq_feats, pos, region, carrier = scan_sequence(ids[b], vid, frame_feats, feats[-1:])
            embeds.append(T._embed(m, ids[b : b + 1], seq_feats, vid))
            masks.append(scan_mask(region, carrier, len(seqs[b][0]), embeds[-1].dtype))
            positions.append(pos)
        h = m.model.language_model(inputs_embeds=torch.cat(embeds), attention_mask=torch.stack(masks),
                                   position_ids=torch.stack(positions), use_cache=False).last_hidden_state
        return h, torch.roll(ids, -1, dims=1), grp

    def _train_step(self) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        r, step, m = self.r, self.step, self.model
        hold = r.hold[step % len(r.hold)]
        start = step * r.clip_batch
        clips = [D.clip_sample("train", r.seed, i, num_frames=T.NUM_FRAMES, k=r.qas_per_clip)
                 for i in range(start, start + r.clip_batch)]
        turns = []
        for j, c in enumerate(clips):
            rng = D.sample_rng("video", "train", r.seed + 7919, start + j)
            qas = [] if rng.random() < r.desc_first else [(qa.question, qa.answer) for qa in c.questions]
            turns.append(qas + [(T.VIDEO_CAPTION_PROMPT, c.description)])
        frames = [np.repeat(np.asarray(c.frames), hold, axis=0) for c in clips]
        stats: dict[str, float] = {"hold": hold}
        with torch.autocast("cpu", torch.bfloat16):
            h, tgt, grp = self._forward(frames, turns)
            loss = torch.zeros(())
            for g, w, name in ((T.G_QA, 1.0, "qa"), (T.G_DESC, r.desc_weight, "desc")):
                sel = grp == g
                if bool(sel.any()):
                    part = F.cross_entropy(m.lm_head(h[sel]).float(), tgt[sel])
                    loss = loss + w * part
                    stats[f"loss_{name}"] = float(part.detach())
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

    def evaluate(self, batch: int = 16) -> dict[str, float]:
        """Teacher-forced exact match on held-out clips (seed ``eval_seed``), streamed: argmax right at every answer
        token and at the closing <|im_end|> is exactly "greedy decoding from the carriers returns this answer"."""
        import torch

        if self._ev is None:
            self._ev = D.video_dataset("heldout", self.r.eval_clips, seed=self.r.eval_seed, num_frames=T.NUM_FRAMES)
        self.model.eval()
        jobs = [(c, qa) for c in self._ev for qa in c.questions]
        hits: dict[str, list[bool]] = {}
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            for s in range(0, len(jobs), batch):
                chunk = jobs[s : s + batch]
                h, tgt, grp = self._forward([np.asarray(c.frames) for c, _ in chunk],
                                            [[(qa.question, qa.answer)] for _, qa in chunk])
                pred = self.model.lm_head(h).argmax(-1)
                for b, (_, qa) in enumerate(chunk):
                    sel = grp[b] > 0
                    hits.setdefault(qa.qtype, []).append(bool((pred[b][sel] == tgt[b][sel]).all()))
        self.model.train()
        res = {k: float(np.mean(v)) for k, v in sorted(hits.items())}
        res["overall"] = float(np.mean([x for v in hits.values() for x in v]))
        return res

    def run(self, max_steps: int | None = None) -> None:
        from tqdm.auto import tqdm

        r = self.r
        total = r.steps if max_steps is None else min(r.steps, max_steps)
        if self.step == 0:
            self._log({"eval": self.evaluate()})
        bar = tqdm(total=total, initial=self.step, desc="tiny-vlm-scan", disable=not self.progress, dynamic_ncols=True)
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


def train(out_dir: str | Path | None = None, work_dir: str | Path = "tiny-vlm-scan-train", resume: bool = False,
          steps: int | None = None, quick: bool = False, recipe: ScanRecipe | None = None,
          log: Callable[[str], None] = print, progress: bool = True, threads: int | None = None) -> Path:
    """Run the recipe; write the model into ``out_dir`` (default ``work_dir/model``) and return it."""
    import torch

    torch.set_num_threads(threads or T.auto_threads())
    work = Path(work_dir)
    r = recipe if recipe is not None else (ScanRecipe.quick() if quick else ScanRecipe())
    if not resume and (work / "ckpt").exists():
        raise MMFastError(f"{work} already holds a training run: pass --resume to continue it, or another --work-dir")
    tr = _ScanTrainer(r, work, log=log, progress=progress)
    if resume and tr.load():
        log(f"resumed {work}: step {tr.step}, {tr.elapsed / 60:.1f} min trained so far")
    elif not resume:
        (work / "log.jsonl").unlink(missing_ok=True)
    tr.run(max_steps=steps)
    out = Path(out_dir) if out_dir is not None else work / "model"
    T.save_model(tr.model, tr.processor, out)
    summary = {"recipe": asdict(r), "steps": tr.step, "train_minutes": round(tr.elapsed / 60, 1),
               "cpu_minutes": round(tr.cpu_elapsed / 60, 1)}
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    try:
        plot_curves(work / "log.jsonl", work / "curves.png")
    except ImportError:
        pass
    log(f"tiny-vlm-scan written to {out} ({tr.elapsed / 60:.1f} min of training)")
    return out


def plot_curves(log_path: str | Path, png_path: str | Path) -> Path:
    """Training loss and held-out streamed exact match per question type vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(x) for x in Path(log_path).read_text().splitlines() if x.strip()]
    evals = {rec["step"]: rec["eval"] for rec in recs if "eval" in rec}
    train = [(rec["step"], rec["train"]["loss"]) for rec in recs if "train" in rec]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        a.plot(*zip(*train))
    a.set(title="tiny-vlm-scan: training loss", xlabel="step")
    steps = sorted(evals)
    for key in sorted({k for e in evals.values() for k in e}):
        b.plot(steps, [evals[s].get(key, np.nan) for s in steps], "-" if key == "overall" else "--", label=key)
    b.set(title="held-out streamed video QA (teacher forced)", xlabel="step", ylim=(0, 1))
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
