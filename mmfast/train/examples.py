"""The tiny-vlm part of ``make demo``: held-out scenes and clips, the model's answers beside the expected ones."""

from __future__ import annotations

from typing import Any

import typer

from mmfast.train import data as D


def zoo_examples(image_qa: Any, video_qa: Any, seed: int = 0, n_images: int = 2, n_clips: int = 1) -> None:
    """Ask tiny-vlm about held-out samples (backgrounds and seeds it never trained on) and print right / wrong."""
    right = total = 0
    for i in range(n_images):
        s = D.image_sample("heldout", seed, i, k=5)
        typer.echo(f"[held-out scene {i}] {s.description}")
        for qa in s.questions:
            got = image_qa(image=s.image, question=qa.question, max_new_tokens=8)["answer"]
            ok = got.strip() == qa.answer
            right, total = right + ok, total + 1
            typer.echo(f"   {'✓' if ok else '✗'} {qa.question:45s} expected {qa.answer!r:14s} got {got!r}")
    for i in range(n_clips):
        c = D.clip_sample("heldout", seed, i)
        typer.echo(f"[held-out clip {i}, {c.clip.num_frames} frames] {c.description}")
        for qa in c.clip.questions:
            got = video_qa(video=c.frames, question=qa.question, num_frames=c.clip.num_frames, max_new_tokens=8)["answer"]
            ok = got.strip() == qa.answer
            right, total = right + ok, total + 1
            typer.echo(f"   {'✓' if ok else '✗'} {qa.question:45s} expected {qa.answer!r:14s} got {got!r}")
    typer.echo(f"   {right}/{total} right on these examples (full held-out numbers: `mmfast zoo eval tiny-vlm`)\n")
