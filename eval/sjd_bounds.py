"""Upper bounds on draft-and-verify step compression for tiny-ar (why SJD stays near 1.56x there).

Plugs oracle drafters into mmfast's own speculative loop (:func:`mmfast.accel.speculative.speculative_decode`,
strict acceptance, window 16); the oracle's extra model calls are not counted as steps:

* ``exact``: drafts sampled from the true conditional of the current prefix, q = p: every draft is accepted, so
  the compression is the loop's ceiling (64 tokens in ceil(63 / 16) + 1 = 5 steps: 12.8x) — checks the accounting;
* ``greedy``: drafts = argmax of the true conditional, one-hot q, so acceptance = max p. Any scheme that proposes
  point masses (SJD's fresh / repeat initialisations) can do no better than this on average;
* ``stale1``: drafts sampled as a consistent chain from a prefix that is wrong only at the last committed token,
  with their distributions as q: the best case for a Jacobi carry, whose drafts were conditioned on the previous
  iteration's (often resampled) tokens.

Usage: ``OMP_NUM_THREADS=1 python eval/sjd_bounds.py --samples 50 --json eval/results/sjd-bounds.json``
"""

from __future__ import annotations

import argparse
import json

import torch

import mmfast
from mmfast.accel.speculative import Drafter, StrictRule, speculative_decode
from mmfast.models.argen import target_probs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = mmfast.pipeline("class-to-image", model="tiny-ar")
    ad, samp, gpt = pipe.adapter, pipe._sampling(), pipe.adapter.gpt
    n_tok = ad.num_tokens

    @torch.no_grad()
    def next_p(seq: torch.Tensor, label: int) -> torch.Tensor:
        """p (1, V) of the next token after ``seq`` (1, L): CFG + the pipeline's sampling warpers."""
        cond = torch.tensor([label])
        if seq.shape[1] == 0:
            lc, lu = gpt.prefill(cond)[0][:, -1], gpt.prefill(gpt.null_condition(1))[0][:, -1]
        else:
            lc = gpt(seq, cond, drop=torch.zeros(1, dtype=torch.bool))[:, -1]
            lu = gpt(seq, cond, drop=torch.ones(1, dtype=torch.bool))[:, -1]
        return target_probs(torch.cat([lc, lu]), samp)

    class Oracle(Drafter):
        def __init__(self, mode: str, label: int):
            self.mode, self.label = mode, label

        def reset(self, adapter, batch, sampling, generator):  # noqa: ANN001
            super().reset(adapter, batch, sampling, generator)
            self.rejected = None

        def observe(self, p, samples, n, m):  # noqa: ANN001
            self.rejected = self.drafts[:, m] if m < self.drafts.shape[1] else None

        def propose(self, tokens, n, k):  # noqa: ANN001
            seq = tokens[:, :n].clone()
            if self.mode == "stale1":  # the last committed token replaced by a stale one
                if self.rejected is not None:
                    seq[:, n - 1] = self.rejected
                else:
                    seq[:, n - 1] = torch.multinomial(next_p(seq[:, : n - 1], self.label), 1, generator=self.generator)[:, 0]
            toks, qs = [], []
            for _ in range(k):
                p = next_p(seq, self.label)
                x = p.argmax(-1) if self.mode == "greedy" else torch.multinomial(p, 1, generator=self.generator)[:, 0]
                toks.append(x)
                qs.append(p)
                seq = torch.cat([seq, x[:, None]], 1)
            self.drafts = torch.stack(toks, 1) if k else torch.zeros(1, 0, dtype=torch.long)
            if self.mode == "greedy" or k == 0:
                return self.drafts, None
            return self.drafts, torch.stack(qs, 1)

    rows = []
    for mode, n_img in [("exact", 5), ("greedy", args.samples), ("stale1", args.samples)]:
        steps, acc = 0, []
        for i in range(n_img):
            res = speculative_decode(ad, [i % 10], samp, Oracle(mode, i % 10), StrictRule(), 16,
                                     torch.Generator().manual_seed(i), progress=False)
            steps += res.steps
            acc.append(res.stats["mean_accepted"])
        row = {"oracle": mode, "samples": n_img, "steps": round(steps / n_img, 2),
               "step_compression": round(n_tok * n_img / steps, 3), "mean_accepted": round(sum(acc) / len(acc), 3)}
        print(row, flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            from mmfast.bench.harness import provenance

            meta = {"model": "tiny-ar", "window": 16, **provenance()}
            json.dump({"suite": "sjd-bounds", "rows": rows, "meta": meta}, f, indent=2)


if __name__ == "__main__":
    main()
