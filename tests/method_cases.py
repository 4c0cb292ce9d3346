"""The method matrix's table (kvpress's ``default_presses``): for every registered method, its identity setting,
which must be token-identical to the baseline, and a reduced setting with the figures it promises.

``check(base, st)`` gets the stats of the baseline and of the reduced setting on the same input and asserts what
the method promises. A method registered without an entry here fails ``test_every_registered_method_has_a_case``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Stats = dict[str, Any]


@dataclass(frozen=True)
class Case:
    #: spec that must give the baseline's tokens (VLM: answer and KV bytes; AR: greedy tokens); None only for a
    #: method that changes the input sequence itself (VideoScan adds carriers): its exactness is its own test
    identity: str | None
    reduced: str  # spec whose promised figures ``check`` asserts
    check: Callable[[Stats, Stats], None]


def _fewer_visual_tokens(limit: float) -> Callable[[Stats, Stats], None]:
    def check(base: Stats, st: Stats) -> None:
        assert st["visual_tokens_in"] == base["visual_tokens_in"]
        assert st["visual_tokens_kept"] <= limit * st["visual_tokens_in"], st
        assert st["kv_tokens"] == st["prompt_tokens"] < base["prompt_tokens"]

    return check


def _kv_window(base: Stats, st: Stats) -> None:
    assert st["kv_tokens"] == st["kv_tokens_end"] == 10  # sink + recent, after prefill and at the end
    assert st["visual_tokens_kept"] == base["visual_tokens_kept"]


def _fastv(base: Stats, st: Stats) -> None:
    visual = st["visual_tokens_kept"]
    assert visual == base["visual_tokens_kept"]  # the vision stage is untouched ...
    late = st["visual_tokens_late"]
    first, *later = st["prefill_layers"]
    assert first["tokens"] == st["prompt_tokens"] and first["probe_rows"] == 1
    dropped = st["prompt_tokens"] - later[0]["tokens"]
    assert all(rec["tokens"] == later[0]["tokens"] for rec in later)
    # ... layers from k on read a quarter of the visual tokens (layout tokens outside image / frame spans stay)
    assert late == round(0.25 * (late + dropped)) and visual - 2 <= late + dropped <= visual
    assert st["kv_bytes"] < base["kv_bytes"]  # their cache holds only the kept tokens


def _lookm(base: Stats, st: Stats) -> None:
    assert st["kv_tokens"] == round(0.2 * st["prompt_tokens"])
    assert st["kv_bytes"] <= 0.25 * base["kv_bytes"]


def _zipvl(base: Stats, st: Stats) -> None:
    assert st["kv_tokens"] == st["prompt_tokens"]  # every entry kept, at 4 or 2 bits
    assert st["kv_bytes"] < base["kv_bytes"] / 4  # vs the fp32 baseline
    assert 0 < st["important_ratio"] <= 1
    assert st["prefill_layers"] and all(rec["probe_rows"] > 0 for rec in st["prefill_layers"])  # probed every layer


def _videoscan(base: Stats, st: Stats) -> None:
    """A stream of 6 frames against the full-cache stream: one carrier per chunk held instead of the frames."""
    assert st["carriers_held"] == st["frame_tokens_held"] >= 3  # one per frame (Qwen: per 2-frame patch)
    assert st["tokens_held"] == base["tokens_held"] - base["frame_tokens_held"] + st["carriers_held"]
    assert st["kv_bytes"] * 3 < base["kv_bytes"] and st["new_tokens"] == 6


def _decoder(**promises: float) -> Callable[[Stats, Stats], None]:
    def check(base: Stats, st: Stats) -> None:
        assert st["tokens"] == base["tokens"]
        assert st["steps"] <= base["steps"] and st["step_compression"] >= 1.0
        if "max_tv" in promises:
            assert st["max_tv"] <= promises["max_tv"] + 1e-6
        if "group" in promises:
            assert st["mean_group_size"] >= promises["group"]

    return check


CASES: dict[str, Case] = {
    # vision stage
    "pool": Case("pool(factor=1)", "pool(factor=2)", _fewer_visual_tokens(0.35)),
    "random": Case("random(keep=1.0)", "random(keep=0.25)", _fewer_visual_tokens(0.35)),
    "adaptive_pool": Case("adaptive_pool(keep=1.0)", "adaptive_pool(keep=0.25)", _fewer_visual_tokens(0.4)),
    "turbo": Case("turbo(keep=1.0)", "turbo(keep=0.25)", _fewer_visual_tokens(0.4)),
    "tokenflex": Case("tokenflex(keep=1.0)", "tokenflex(keep=0.25)", _fewer_visual_tokens(0.4)),
    "visionzip": Case("visionzip(keep=1.0)", "visionzip(keep=0.25)", _fewer_visual_tokens(0.4)),
    # prefill stage
    "fastv": Case("fastv(k=1,keep=1.0)", "fastv(k=1,keep=0.25)", _fastv),
    # kv stage
    "kv_window": Case("kv_window(sink=4,recent=100000)", "kv_window(sink=2,recent=8)", _kv_window),
    "lookm": Case("lookm(budget=1.0)", "lookm(budget=0.2)", _lookm),
    "zipvl": Case("zipvl(tau=1,mode='evict')", "zipvl()", _zipvl),
    # stream stage (streaming-video-qa; the full-cache stream's exactness is tests/test_streaming.py)
    "videoscan": Case(None, "videoscan(memory=64)", _videoscan),
    # decode stage (identity: the lossless rule under greedy sampling; reduced: the model's sampling)
    "sjd": Case("sjd()", "sjd()", _decoder()),
    # the reference residual also drops zero-mass neighbours, so only the relaxed one is lossless at delta=0
    "lantern": Case("lantern(delta=0.0,residual='relaxed')", "lantern(delta=0.1)", _decoder(max_tv=0.1)),
    "gsd": Case("gsd(prob_threshold=0.0)", "gsd()", _decoder(group=1.0)),
    "eagle_sd": Case("eagle_sd()", "eagle_sd()", _decoder()),
    # decode stage, next-scale models (identity: handing off to the drafter itself = the drafter alone)
    "code": Case("code(refiner='self',draft_scales=3)", "code(refiner='self',draft_scales=2)", _decoder()),
}
