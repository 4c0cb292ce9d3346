"""The method x family matrix, driven by the registry: every registered method runs on every family whose adapter
offers what it needs (``applies_to``, ``requires``), one test per pair, on the session's shared tiny models.

* identity: the method's identity setting (keep=1 / budget=1 / tau=1 / a lossless rule under greedy sampling)
  gives the baseline's tokens, on images and videos;
* reduced: the reduced setting delivers the figures it promises (:mod:`method_cases`), and leaves the adapter
  unhooked afterwards.
"""

from __future__ import annotations

import pytest
import torch
from conftest import AR_FAMILIES
from method_cases import CASES

import mmfast
from mmfast.accel import REGISTRY
from mmfast.models.registry import ARGEN_ADAPTERS, load_class, vlm_adapter_class
from mmfast.train.tiny_models import FAMILIES, make_test_image, make_test_video
from mmfast.types import Stage

GEN = {"max_new_tokens": 6}
Q = "What is this?"


def _adapter_class(family: str) -> type:
    return load_class(ARGEN_ADAPTERS[family]) if family in AR_FAMILIES else vlm_adapter_class(family)


def _supports(method: str, family: str) -> bool:
    cls, acc = _adapter_class(family), REGISTRY[method]
    same_order = Stage.DECODE not in acc.stages or getattr(acc, "order", "raster") == getattr(cls, "order", "raster")
    return cls.kind in acc.applies_to and set(acc.requires) <= set(cls.capabilities) and same_order


PAIRS = [(m, f) for m in sorted(REGISTRY) for f in (*FAMILIES, *AR_FAMILIES) if _supports(m, f)]
IDENTITY_PAIRS = [(m, f) for m, f in PAIRS if CASES[m].identity is not None]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_registered_method_has_a_case_and_a_family():
    assert sorted(CASES) == sorted(REGISTRY), "register a method in tests/method_cases.py to test it"
    for name in REGISTRY:
        assert any(m == name for m, _ in PAIRS), f"{name} applies to no family of the test models"


def _vlm_inputs(vlm_pipes, family):
    img, vid = vlm_pipes[family]
    yield img, {"image": make_test_image(0)}
    if vid is not None:
        yield vid, {"video": make_test_video(4)}


def _run_vlm(pipe, spec, kw):
    return type(pipe)(pipe.adapter, mmfast.accel.resolve(spec))(question=Q, **kw, **GEN)


def _run_ar(adapter, spec, greedy):
    pipe = mmfast.pipeline("class-to-image", model=adapter, accelerate=spec)
    sampling = {"top_k": 1} if greedy else {}
    return pipe(_condition(adapter), seed=0,
                output_type="tokens", progress=False, **sampling)


def _condition(adapter):
    return [0] if adapter.conditioning == "class" else ["a photo"]


@pytest.mark.parametrize("method,family", IDENTITY_PAIRS)
def test_identity_setting_is_the_baseline(method, family, request):
    case = CASES[method]
    if family in AR_FAMILIES:
        adapter = request.getfixturevalue("ar_adapters")[family]
        base, out = _run_ar(adapter, None, True), _run_ar(adapter, case.identity, True)
        assert torch.equal(out.tokens, base.tokens)
        return
    for pipe, kw in _vlm_inputs(request.getfixturevalue("vlm_pipes"), family):
        base, out = pipe(question=Q, **kw, **GEN), _run_vlm(pipe, case.identity, kw)
        assert out["answer"] == base["answer"]
        for key in ("visual_tokens_kept", "prompt_tokens", "kv_bytes", "kv_bytes_end"):
            assert out["stats"][key] == base["stats"][key], key


@pytest.mark.parametrize("method,family", PAIRS)
def test_reduced_setting_keeps_its_promises(method, family, request):
    case = CASES[method]
    if family in AR_FAMILIES:
        adapter = request.getfixturevalue("ar_adapters")[family]
        base, out = _run_ar(adapter, None, False), _run_ar(adapter, case.reduced, False)
        case.check(base.stats, out.stats)
        assert out.tokens.shape == base.tokens.shape
        return
    if Stage.STREAM in REGISTRY[method].stages:  # a stream of 6 frames against the full-cache stream
        img, _ = request.getfixturevalue("vlm_pipes")[family]
        st = {}
        for spec in (None, case.reduced):
            s = mmfast.pipeline("streaming-video-qa", model=(img.model, img.processor), accelerate=spec)
            s.push(make_test_video(6, seed=2))
            st[spec] = {**s.ask(Q, **GEN)["stats"], **s.state}
        case.check(st[None], st[case.reduced])
        return
    for pipe, kw in _vlm_inputs(request.getfixturevalue("vlm_pipes"), family):
        base = pipe(question=Q, **kw, **GEN)["stats"]
        st = _run_vlm(pipe, case.reduced, kw)["stats"]
        assert st["new_tokens"] == GEN["max_new_tokens"]
        case.check(base, st)
        ad = pipe.adapter  # unhooked: no method left on the adapter, the LM's attention as it was
        assert not (ad.vision_methods or ad.prefill_methods or ad.kv_methods)
        assert ad.language_model.config._attn_implementation == "sdpa"
        assert all(not layer._forward_pre_hooks and not layer.self_attn._forward_pre_hooks
                   for layer in ad.decoder_layers)
