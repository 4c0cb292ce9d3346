"""The accelerator framework: spec parsing, registry errors, composition order and conflicts, hooks."""

from __future__ import annotations

import pytest
import torch

import mmfast.accel as A
from mmfast.errors import ConfigError, IncompatibleAcceleratorError
from mmfast.types import VisualTokens


def test_parse_spec_builds_configured_instances():
    accs = A.parse_spec("pool(factor=4)+kv_window(sink=2, recent=8)")
    assert [type(a) for a in accs] == [A.Pool, A.KVWindow]
    assert accs[0].factor == 4 and (accs[1].sink, accs[1].recent) == (2, 8)
    assert A.parse_spec("random")[0].keep == 0.25  # defaults


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("nope", "Valid names: .*kv_window.*pool, random"),
        ("pool(size=2)", "Valid parameters: factor"),
        ("pool(factor=0)", "factor must be an integer >= 1"),
        ("pool(factor=1.5)", "factor must be an integer"),
        ("random(keep=0)", "keep must be a fraction"),
        ("random(keep=1.5)", "keep must be a fraction"),
        ("kv_window(recent=0)", "recent must be an integer >= 1"),
        ("pool(2)", "parameters must be named"),
        ("pool(factor=", "Cannot parse"),
        ("", "Empty accelerate spec"),
    ],
)
def test_bad_specs_raise_config_error(spec, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        A.resolve(spec) if spec else A.parse_spec(spec)


def test_compose_orders_by_stage_and_rejects_conflicts():
    composed = A.resolve([A.KVWindow(), "pool(factor=2)"])
    assert [a.name for a in composed] == ["pool", "kv_window"]
    assert composed.spec() == "pool(factor=2)+kv_window(sink=4,recent=64)"
    with pytest.raises(IncompatibleAcceleratorError, match="vision stage"):
        A.resolve("pool+random")
    with pytest.raises(IncompatibleAcceleratorError, match="kv stage"):
        A.resolve("kv_window+kv_window(sink=1)")
    assert len(A.resolve(None)) == 0 and A.resolve("baseline").spec() == "baseline"


def test_spec_round_trips():
    for spec in ["pool(factor=3)", "random(keep=0.5,seed=7)", "kv_window(sink=1,recent=9)"]:
        assert A.resolve(spec).spec() == spec
        assert A.resolve(A.resolve(spec).spec()).spec() == spec


class _FakeAdapter:
    kind = "vlm"

    def __init__(self):
        self.added = []

    def add_accelerator(self, acc):
        self.added.append(acc)

    def remove_accelerator(self, acc):
        self.added.remove(acc)


def test_context_manager_always_unhooks():
    adapter, acc = _FakeAdapter(), A.Pool()
    with pytest.raises(RuntimeError):
        with A.resolve([acc, A.KVWindow()])(adapter):
            assert len(adapter.added) == 2
            raise RuntimeError("boom")
    assert adapter.added == []


def test_incompatible_kind():
    adapter = _FakeAdapter()
    adapter.kind = "argen"
    with pytest.raises(IncompatibleAcceleratorError, match="applies to vlm"):
        with A.Pool()(adapter):
            pass


# ------------------------------------------------------------------ pool / random on hand-built tokens
def _grid(rows=4, cols=4, frames=1, newline=False, trailing=False, d=3):
    blocks = [(0, frames, rows, cols, newline)] + ([(0, 0, 0, 0, True)] if trailing else [])
    n = frames * rows * (cols + int(newline)) + int(trailing)
    feats = torch.arange(n * d, dtype=torch.float32).reshape(n, d)
    return VisualTokens.from_grid(feats, blocks, kind="image", index=0, token_id=9)


def test_pool_averages_2x2_windows_exactly():
    tok = _grid(4, 4)
    out = A.Pool(factor=2).reduce(tok)
    assert len(out) == 4 and out.n_original == 16
    # window (0,0) holds tokens 0,1,4,5: anchor = 0 (top-left), mean of their features
    for k, members in enumerate([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]):
        assert out.source[k].item() == members[0]
        torch.testing.assert_close(out.features[k], tok.features[members].mean(0))
        assert out.sizes[k].item() == 4
    assert out.grids == {0: (2, 2)}


def test_pool_keeps_one_newline_per_pooled_row_and_the_trailing_one():
    tok = _grid(4, 4, newline=True, trailing=True)  # 4 rows of 4 + newline, then a trailing newline = 21
    out = A.Pool(factor=2).reduce(tok)
    assert len(out) == 4 + 2 + 1
    # order: row-group 0 (2 pooled tokens) then the newline closing row 1, ...
    lay = out.layout_mask.tolist()
    assert lay == [False, False, True, False, False, True, True]
    assert out.source[2].item() == 9  # newline after row 1 (rows have 5 entries: 0-4, 5-9)


def test_pool_odd_grid_and_frames():
    tok = _grid(3, 5, frames=2)
    out = A.Pool(factor=2).reduce(tok)
    assert len(out) == 2 * 2 * 3  # ceil(3/2) x ceil(5/2) per frame
    assert out.sizes.sum().item() == 30  # every original token counted exactly once
    assert set(out.coords[:, 1].tolist()) == {0, 1}  # frames never mixed


def test_random_keep_is_seeded_subset_in_order():
    tok = _grid(8, 8, newline=True)
    a = A.RandomKeep(keep=0.25, seed=3).reduce(tok)
    b = A.RandomKeep(keep=0.25, seed=3).reduce(tok)
    c = A.RandomKeep(keep=0.25, seed=4).reduce(tok)
    assert torch.equal(a.source, b.source) and not torch.equal(a.source, c.source)
    assert int((~a.layout_mask).sum()) == 16 and int(a.layout_mask.sum()) == 8  # newlines kept
    assert bool((a.source.diff() > 0).all())
    torch.testing.assert_close(a.features, tok.features[a.source])
    assert A.RandomKeep(keep=1.0).reduce(tok) is tok
