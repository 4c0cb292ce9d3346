"""Tests of the tiny-vlm synthetic data generator (mmfast/zoo/data.py).

Statistics are measured on questions only (``render=False``), which is exact for answers and keeps this file fast;
pixels are checked on a few rendered samples.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from mmfast.errors import ConfigError
from mmfast.train import data as D

N_STATS = 2000


@pytest.fixture(scope="module")
def heldout_images() -> list[D.Sample]:
    return D.image_dataset("heldout", N_STATS, seed=0, render=False)


@pytest.fixture(scope="module")
def train_images() -> list[D.Sample]:
    return D.image_dataset("train", N_STATS, seed=0, render=False)


@pytest.fixture(scope="module")
def heldout_clips() -> list[D.ClipSample]:
    return D.video_dataset("heldout", N_STATS, seed=0, render=False)


# --------------------------------------------------------------------------------------------------------------
# determinism and splits
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", D.SPLITS)
def test_image_samples_are_deterministic_and_order_free(split: str) -> None:
    later = D.image_sample(split, 3, 7)  # generated before the earlier index: order must not matter
    a = [D.image_sample(split, 3, i) for i in range(8)]
    b = D.image_dataset(split, 8, seed=3)
    for x, y in zip(a, b, strict=True):
        assert x.image.tobytes() == y.image.tobytes()
        assert x.questions == y.questions and x.description == y.description
    assert later.image.tobytes() == a[7].image.tobytes()
    assert a[0].image.dtype == np.uint8 and a[0].image.shape == (96, 96, 3)
    assert len({s.image.tobytes() for s in a}) == 8  # different indices differ
    other_seed = D.image_sample(split, 4, 0)
    assert other_seed.image.tobytes() != a[0].image.tobytes()


def test_render_flag_does_not_change_the_scene() -> None:
    with_px = D.image_sample("train", 1, 2)
    without = D.image_sample("train", 1, 2, render=False)
    assert without.image is None
    assert with_px.scene.objects == without.scene.objects and with_px.questions == without.questions


def test_clips_are_deterministic() -> None:
    a, b = D.clip_sample("train", 5, 1), D.clip_sample("train", 5, 1)
    assert a.frames.tobytes() == b.frames.tobytes() and a.questions == b.questions
    assert [str(e) for e in a.clip.events] == [str(e) for e in b.clip.events]
    assert D.clip_sample("train", 5, 2).frames.tobytes() != a.frames.tobytes()
    assert D.clip_sample("train", 6, 1).frames.tobytes() != a.frames.tobytes()


def test_train_and_heldout_photos_are_disjoint(train_images, heldout_images) -> None:
    train_names = {p.name for p in D.TRAIN_PHOTOS}
    held_names = {p.name for p in D.HELDOUT_PHOTOS}
    assert not train_names & held_names
    assert not {D._photo_path(p) for p in D.TRAIN_PHOTOS} & {D._photo_path(p) for p in D.HELDOUT_PHOTOS}
    used_train = {s.scene.background_id for s in train_images}
    used_held = {s.scene.background_id for s in heldout_images}
    assert used_train == train_names and used_held == held_names
    clips = D.video_dataset("heldout", 50, seed=0, render=False)
    assert {c.clip.background_id for c in clips} <= held_names
    # every photo loads offline and is cached at the documented size
    for p in D.TRAIN_PHOTOS + D.HELDOUT_PHOTOS:
        assert min(D._load_photo(p).size) <= 192


def test_split_streams_differ() -> None:
    for i in range(20):
        t = D.image_sample("train", 0, i, render=False).scene.objects
        h = D.image_sample("heldout", 0, i, render=False).scene.objects
        assert [(o.x, o.y) for o in t] != [(o.x, o.y) for o in h]


def test_heldout_objects_are_off_grid_and_grid_option(heldout_images) -> None:
    for s in heldout_images:
        for o in s.scene.objects:
            assert not D._on_grid(o.x, o.y, 8)
    aligned = D.image_dataset("train", 100, seed=1, grid_aligned=True, render=False)
    for s in aligned:
        for o in s.scene.objects:
            assert (o.x - 4) % 8 == 0 and (o.y - 4) % 8 == 0
    with pytest.raises(ConfigError):
        D.make_scene(0, "heldout", grid_aligned=True)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError):
        D.make_scene(0, "test")
    with pytest.raises(ConfigError):
        D.make_scene(0, "train", n_objects=7)
    with pytest.raises(ConfigError):
        D.make_clip(0, "train", num_frames=7)
    with pytest.raises(ConfigError):
        D.make_clip(0, "train", num_frames=33)
    with pytest.raises(ConfigError):
        D.image_questions(D.make_scene(0, render=False), np.random.default_rng(0), qtypes=("colour",))


# --------------------------------------------------------------------------------------------------------------
# scenes and text
# --------------------------------------------------------------------------------------------------------------


def test_scenes_objects_counts_and_no_overlap(train_images) -> None:
    ns = Counter(len(s.scene.objects) for s in train_images)
    assert set(ns) == set(range(1, 7)) and min(ns.values()) > N_STATS / 6 * 0.8
    for s in train_images[:500]:
        objs = s.scene.objects
        for i, a in enumerate(objs):
            assert a.r + 1 <= a.x <= 95 - a.r and a.r + 1 <= a.y <= 95 - a.r
            for b in objs[i + 1:]:
                assert abs(a.x - b.x) >= a.r + b.r + 2 - 1e-6 or abs(a.y - b.y) >= a.r + b.r + 2 - 1e-6
    sizes = Counter(o.size for s in train_images for o in s.scene.objects)
    shapes = Counter(o.shape for s in train_images for o in s.scene.objects)
    colors = Counter(o.color for s in train_images for o in s.scene.objects)
    assert set(sizes) == set(D.SIZES) and set(shapes) == set(D.SHAPES) and set(colors) == set(D.COLORS)


def test_n_objects_option() -> None:
    assert all(len(D.make_scene(i, n_objects=1, render=False).objects) == 1 for i in range(20))
    assert {len(D.make_scene(i, n_objects=range(2, 4), render=False).objects) for i in range(40)} == {2, 3}


def test_objects_are_drawn_with_their_colour() -> None:
    for i in range(30):
        s = D.image_sample("heldout", 2, i)
        for o in s.scene.objects:
            # the centre of every shape is inside its fill, away from the anti-aliased edge and outline
            px = s.image[int(o.y), int(o.x)].astype(int)
            assert np.abs(px - np.array(o.rgb)).max() <= 40, (o, px)


def test_describe_caption_and_patch_labels() -> None:
    s = D.image_sample("train", 0, 11, n_objects=3)
    objs = sorted(s.scene.objects, key=lambda o: o.x)
    parts = s.description.split(", ")
    assert len(parts) == 3
    for o, part in zip(objs, parts, strict=True):
        assert part == f"{o.size} {o.color} {o.shape} {D.region_of(o.x, o.y)}"
    objs = [
        D.Obj("circle", "red", "small", 20.5, 20.5, 8.0),
        D.Obj("star", "blue", "large", 70.5, 30.5, 12.0),
        D.Obj("circle", "red", "small", 40.5, 70.5, 8.0),
        D.Obj("cross", "orange", "small", 75.5, 75.5, 8.0),
    ]
    scene = D.Scene("x", objs, None)
    assert D.caption(scene) == "two red circles, a blue star and an orange cross"
    lab = D.patch_labels(scene)
    assert set(lab) == {"color", "shape", "size", "region", "object", "coverage"}
    assert lab["shape"].shape == (12, 12) and lab["shape"].dtype == np.int64
    assert lab["shape"][20 // 8, 20 // 8] == 1 + D.SHAPES.index("circle")
    assert lab["color"][30 // 8, 70 // 8] == 1 + list(D.COLORS).index("blue")
    assert lab["object"][75 // 8, 75 // 8] == 3 and lab["coverage"][75 // 8, 75 // 8] > 0.5
    assert lab["shape"][0, 11] == 0 and lab["object"][0, 11] == -1  # empty corner is background
    assert ((lab["object"] >= 0) == (lab["shape"] > 0)).all()


# --------------------------------------------------------------------------------------------------------------
# image questions
# --------------------------------------------------------------------------------------------------------------


def _all_text(samples) -> list[str]:
    out = []
    for s in samples:
        out += [q.question for q in s.questions] + [q.answer for q in s.questions] + [s.description]
        if isinstance(s, D.Sample):
            out.append(s.caption)
    return out


def test_vocabulary_covers_all_text(heldout_images, heldout_clips, train_images) -> None:
    vocab = D.vocabulary()
    assert vocab == sorted(set(vocab)) and all(w == w.lower() for w in vocab)
    words = set(vocab)
    for text in _all_text(heldout_images[:800] + train_images[:800] + heldout_clips[:800]):
        missing = set(D.tokenize(text)) - words
        assert not missing, (text, missing)
    assert D.tokenize("is there an orange star?") == ["is", "there", "an", "orange", "star", "?"]
    for s in heldout_images[:500]:
        for q in s.questions:
            assert 1 <= len(D.tokenize(q.answer)) <= 2


def _answer_shares(samples) -> dict[str, Counter]:
    by: dict[str, Counter] = {}
    for s in samples:
        for q in s.questions:
            by.setdefault(q.qtype, Counter())[q.answer] += 1
    return by


def _check_balance(by: dict[str, Counter], qtypes: tuple[str, ...]) -> None:
    assert set(by) == set(qtypes)
    for t, c in by.items():
        total = sum(c.values())
        assert total >= 500, (t, total)
        top = c.most_common(1)[0][1] / total
        if len(c) >= 3:
            assert top <= 0.40, (t, c)
        else:
            assert 0.45 <= top <= 0.55, (t, c)


def test_image_answers_balanced(heldout_images) -> None:
    by = _answer_shares(heldout_images)
    _check_balance(by, D.IMAGE_QTYPES)
    assert set(by["exists"]) == {"yes", "no"}
    assert set(by["color"]) == set(D.COLORS) and set(by["shape"]) == set(D.SHAPES)
    base = D.majority_baseline(heldout_images)
    assert set(base) == set(D.IMAGE_QTYPES) | {"overall"}
    assert base["overall"] < 0.35
    assert sum(len(s.questions) for s in heldout_images) / len(heldout_images) >= 2.8


_COLOR = "|".join(D.COLORS)
_SHAPE = "|".join(D.SHAPES)
_PLURAL = {v: k for k, v in D._PLURALS.items()}


def _resolve(ref: str, objs: list[D.Obj]) -> D.Obj:
    """The one object a referring expression names; fails when it is ambiguous."""
    words = ref.split()
    if words[-1] == "object":
        hits = [o for o in objs if o.color == words[0]]
    elif len(words) == 2:
        hits = [o for o in objs if (o.color, o.shape) == (words[0], words[1])]
    else:
        hits = [o for o in objs if o.shape == words[0]]
    assert len(hits) == 1, (ref, objs)
    return hits[0]


def test_image_answers_are_correct(heldout_images) -> None:
    n = D.NUMBER_WORDS
    for s in heldout_images:
        objs = s.scene.objects
        for q in s.questions:
            text, ans = q.question, q.answer
            if m := re.fullmatch(rf"is there an? ({_COLOR}) ({_SHAPE})\?", text):
                assert q.qtype == "exists"
                assert ans == ("yes" if any((o.color, o.shape) == m.groups() for o in objs) else "no")
            elif text == "how many objects are there?":
                assert ans == n[len(objs)]
            elif m := re.fullmatch(rf"how many ({_COLOR}) objects are there\?", text):
                assert ans == n[sum(o.color == m[1] for o in objs)]
            elif m := re.fullmatch(r"how many (\w+) are there\?", text):
                assert ans == n[sum(o.shape == _PLURAL[m[1]] for o in objs)]
            elif m := re.fullmatch(rf"what color is the ({_SHAPE})\?", text):
                hits = [o for o in objs if o.shape == m[1]]
                assert len(hits) == 1 and ans == hits[0].color  # asked only when the shape is unique
            elif m := re.fullmatch(rf"what shape is the ({_COLOR}) object\?", text):
                hits = [o for o in objs if o.color == m[1]]
                assert len(hits) == 1 and ans == hits[0].shape  # asked only when the colour is unique
            elif m := re.fullmatch(r"where is the ([a-z ]+)\?", text):
                o = _resolve(m[1], objs)
                assert ans == D.region_of(o.x, o.y) and D._region_margin(o.x, o.y, 96) >= 3 - 1e-6
            elif m := re.fullmatch(r"is the ([a-z ]+) left or right of the ([a-z ]+)\?", text):
                a, b = _resolve(m[1], objs), _resolve(m[2], objs)
                assert abs(a.x - b.x) >= 8 and ans == ("left" if a.x < b.x else "right")
            else:
                raise AssertionError(f"unknown question form: {text!r}")


# --------------------------------------------------------------------------------------------------------------
# video
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [8, 16, 32])
def test_clips_have_requested_frames(num_frames: int) -> None:
    c = D.make_clip(num_frames, "heldout", num_frames=num_frames)
    assert c.frames.shape == (num_frames, 96, 96, 3) and c.frames.dtype == np.uint8
    assert c.num_frames == num_frames and c.questions and c.events
    assert len({c.frames[t].tobytes() for t in range(num_frames)}) > 1 or not any(
        tr.t_in or tr.t_out < num_frames or tr.direction or tr.t_change is not None for tr in c.tracks)
    # every visible object shows its colour of that frame at its centre
    for t in range(num_frames):
        for tr in c.tracks:
            if tr.visible(t):
                x, y = tr.pos(t)
                px = c.frames[t, int(y), int(x)].astype(int)
                assert np.abs(px - np.array(tr.rgb_at(t))).max() <= 40


def test_video_answers_balanced(heldout_clips) -> None:
    by = _answer_shares(heldout_clips)
    _check_balance(by, D.VIDEO_QTYPES)
    assert set(by["direction"]) == set(D.DIRECTIONS) and set(by["when"]) == set(D.PHASES)
    base = D.majority_baseline(heldout_clips)
    assert set(base) == set(D.VIDEO_QTYPES) | {"overall"} and base["overall"] < 0.35


def test_video_answers_consistent_with_script(heldout_clips) -> None:
    for cs in heldout_clips:
        clip = cs.clip
        T = clip.num_frames
        shapes = [tr.shape for tr in clip.tracks]
        assert len(set(shapes)) == len(shapes)  # shapes name objects unambiguously
        by_shape = {tr.shape: tr for tr in clip.tracks}
        for tr in clip.tracks:
            assert 0 <= tr.t_in < tr.t_out <= T
            for t in range(tr.t_in, tr.t_out):
                x, y = tr.pos(t)
                assert tr.r <= x <= 96 - tr.r and tr.r <= y <= 96 - tr.r
        for q in cs.questions:
            text, ans = q.question, q.answer
            if m := re.fullmatch(rf"which way does the ({_SHAPE}) move\?", text):
                tr = by_shape[m[1]]
                (x0, y0), (x1, y1) = tr.pos(tr.t_in), tr.pos(tr.t_out - 1)
                dx, dy = x1 - x0, y1 - y0
                expect = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
                assert ans == expect and max(abs(dx), abs(dy)) >= 12 - 1e-6
                steps = np.diff([tr.pos(t) for t in range(tr.t_in, tr.t_out)], axis=0)
                assert np.allclose(steps, steps[0]) and np.abs(steps).max() <= 4 + 1e-6  # constant velocity
            elif m := re.fullmatch(rf"which (appeared|disappeared) first, the ({_SHAPE}) or the ({_SHAPE})\?", text):
                a, b = by_shape[m[2]], by_shape[m[3]]
                key = (lambda tr: tr.t_in) if m[1] == "appeared" else (lambda tr: tr.t_out)
                assert ans == min((a, b), key=key).shape and key(a) != key(b)
            elif m := re.fullmatch(rf"what color is the ({_SHAPE}) at the (start|end)\?", text):
                tr, t = by_shape[m[1]], (0 if m[2] == "start" else T - 1)
                assert tr.visible(t) and ans == tr.color_at(t)
            elif m := re.fullmatch(rf"where is the ({_SHAPE}) at the (start|end)\?", text):
                tr, t = by_shape[m[1]], (0 if m[2] == "start" else T - 1)
                assert tr.visible(t) and ans == D.region_of(*tr.pos(t))
            elif m := re.fullmatch(rf"when does the ({_SHAPE}) (appear|disappear|change color)\?", text):
                tr = by_shape[m[1]]
                t = {"appear": tr.t_in, "disappear": tr.t_out, "change color": tr.t_change}[m[2]]
                assert t is not None and 0 < t < T and ans == D.PHASES[min(2, 3 * t // T)]
            elif text == "how many objects appear in total?":
                assert ans == D.NUMBER_WORDS[len(clip.tracks)]
            elif m := re.fullmatch(r"how many objects are there at the (start|end)\?", text):
                t = 0 if m[1] == "start" else T - 1
                assert ans == D.NUMBER_WORDS[sum(tr.visible(t) for tr in clip.tracks)]
            else:
                raise AssertionError(f"unknown question form: {text!r}")


def test_clip_objects_never_overlap(heldout_clips) -> None:
    for cs in heldout_clips[:300]:
        trs = cs.clip.tracks
        for i, a in enumerate(trs):
            for b in trs[i + 1:]:
                assert D._tracks_clear(a, b, cs.clip.num_frames, 2.0)
