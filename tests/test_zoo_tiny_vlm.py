"""tiny-vlm: the training fast path equals the real processor + model path, a smoke training run (with resume),
and the shipped checkpoint loads through ``mmfast.pipeline`` and answers held-out questions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmfast
from mmfast import zoo
from mmfast.errors import ConfigError
from mmfast.train import data as D
from mmfast.train import tiny_vlm as T


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return T.build_model("tiny").eval(), T.build_processor()


def _prompt(proc, question: str, kind: str) -> str:
    msgs = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
    return proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_tokenizer_round_trip_and_template():
    tok = T.build_tokenizer()
    vocab = tok.get_vocab()
    assert all(w in vocab for w in D.vocabulary())
    assert [tok.convert_ids_to_tokens(i) for i in range(len(T.SPECIAL_TOKENS))] == list(T.SPECIAL_TOKENS)
    assert tok.eos_token == T.IM_END and tok.image_token == T.IMAGE and tok.video_token == T.VIDEO
    text = "large red star top left, small blue circle center"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("What COLOR is the star?")["input_ids"] == tok("what color is the star ?")["input_ids"]
    assert tok("a zebra")["input_ids"][-1] == tok.unk_token_id


def test_fast_image_path_equals_processor_and_model(tiny):
    model, proc = tiny
    builder = T.SequenceBuilder(proc.tokenizer)
    s = D.image_sample("heldout", 0, 3)
    q = s.questions[0].question
    inputs = proc(text=[_prompt(proc, q, "image")], images=[Image.fromarray(s.image)], return_tensors="pt")
    ids, groups = builder.encode([(q, None)], "image", T.IMAGE_TOKENS)
    assert ids == inputs["input_ids"][0].tolist() and not any(groups)
    pix = T.image_pixels(s.image[None])
    assert T.IMAGE_TOKENS == 192 and inputs["pixel_values"].shape == (1, 5, 3, 48, 48)
    assert torch.equal(pix, inputs["pixel_values"])
    # the tiles are the image's four quadrants at full resolution (not a second copy of the base view)
    full = (torch.from_numpy(s.image).float().permute(2, 0, 1) - 127.5) / 127.5
    torch.testing.assert_close(pix[0, 2], full[:, :48, 48:], rtol=0, atol=1e-6)
    torch.testing.assert_close(pix[0, 3], full[:, 48:, :48], rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            batch_num_images=inputs["batch_num_images"]).pooler_output[0]
        mine = T.image_features(model, pix)[0]
        assert mine.shape == (T.IMAGE_TOKENS, model.config.text_config.hidden_size)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
        logits = model(**inputs).logits
        emb = T._embed(model, torch.tensor([ids]), T.image_features(model, pix), model.config.image_token_index)
        torch.testing.assert_close(model.lm_head(T._lm_hidden(model, emb)), logits, rtol=1e-5, atol=1e-5)


def test_fast_video_path_equals_processor_and_model(tiny):
    model, proc = tiny
    builder = T.SequenceBuilder(proc.tokenizer)
    c = D.clip_sample("heldout", 0, 1)
    q = c.questions[0].question
    inputs = proc(text=[_prompt(proc, q, "video")], videos=[c.frames], do_sample_frames=False, return_tensors="pt")
    ids, _ = builder.encode([(q, None)], "video", T.VIDEO_TOKENS)
    assert ids == inputs["input_ids"][0].tolist()
    pix = T.video_pixels(c.frames[None])
    assert T.VIDEO_TOKENS == 145 and torch.equal(pix, inputs["pixel_values_videos"])
    with torch.no_grad():
        ref = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
        mine = T.video_features(model, pix)
    assert mine.shape == (1, T.VIDEO_TOKENS, model.config.text_config.hidden_size)
    torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)



def test_held_training_clips_match_the_processor(tmp_path):
    """``Recipe.video_hold``: a stage-4 clip held 2x is 32 frames whose placeholders the processor agrees with."""
    tr = T._Trainer(T.Recipe.quick(), tmp_path, log=lambda _: None, progress=False)
    frames, seqs = tr._clip_seqs(0, 1, hold=2)
    c = D.clip_sample("train", 0, 0, num_frames=T.NUM_FRAMES, k=len(D.VIDEO_QTYPES))
    assert frames.shape[1] == 2 * T.NUM_FRAMES and np.array_equal(frames[0, 2 * 5 + 1], c.frames[5])
    ids = seqs[0][0]
    inputs = tr.processor(text=[_prompt(tr.processor, "q", "video")], videos=[frames[0]], do_sample_frames=False,
                          return_tensors="pt")
    vid = tr.model.config.video_token_index
    assert ids.count(vid) == (inputs["input_ids"][0] == vid).sum() == 2 * (T.VIDEO_TOKENS - 1) + 1

def test_tower_targets_follow_the_crops():
    scene = D.make_scene(D.sample_rng("image", "heldout", 0, 4), "heldout", n_objects=4)
    t = T.tower_targets(scene, tile_position="ignore")
    assert t["color"].shape == (T.N_VIEWS, 36) and t["geom"].shape == (T.N_VIEWS, 36, 4)
    base, fine = D.patch_labels(scene, grid=6), D.patch_labels(scene, grid=12)
    assert np.array_equal(t["shape"][0], base["shape"].ravel())
    # tile 1 is the top-right quadrant: rows 0-5, columns 6-11 of the 8 px grid
    assert np.array_equal(t["shape"][2], fine["shape"][:6, 6:].ravel())
    assert np.array_equal(t["color"][4], fine["color"][6:, 6:].ravel())
    # "ignore": a tile does not know where it sits, so region is ignored on its object cells, absolute position
    # unweighted
    obj = fine["object"][6:, :6].ravel() >= 0
    assert (t["region"][3][obj] == -100).all() and (t["region"][3][~obj] == 0).all()
    assert (t["geom_w"][1:, :, 2:] == 0).all() and (t["geom_w"][0, base["object"].ravel() >= 0] == 1).all()
    # "blank" (the default): a tile's object cells are taught "no position" (region class 0, absolute position 0)
    b = T.tower_targets(scene)
    assert (b["region"][3][obj] == 0).all() and (b["geom_w"][3][obj, 2:] == 1).all()
    assert (b["geom"][1:, :, 2:] == 0).all() and (b["geom"][3][obj, :2] == t["geom"][3][obj, :2]).all()
    assert all(np.array_equal(b[k][0], t[k][0]) for k in t)  # the base view is unchanged
    with pytest.raises(ConfigError):
        T.tower_targets(scene, tile_position="guess")


def test_multi_turn_sequence_matches_chat_template(tiny):
    _, proc = tiny
    builder = T.SequenceBuilder(proc.tokenizer)
    s = D.image_sample("train", 0, 5, k=6)
    turns = [(qa.question, qa.answer) for qa in s.questions] + [(T.CAPTION_PROMPT, s.description)]
    msgs = []
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q}]
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    text = proc.apply_chat_template(msgs, tokenize=False)
    ref = proc(text=[text], images=[Image.fromarray(s.image)], return_tensors="pt")["input_ids"][0].tolist()
    ids, groups = builder.encode(turns, "image", T.IMAGE_TOKENS)
    assert ids == ref
    # supervised tokens: every answer and description token plus each closing <|im_end|>
    tok = proc.tokenizer
    n_sup = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for _, a in turns)
    assert sum(g > 0 for g in groups) == n_sup
    assert sum(g == T.G_DESC for g in groups) == len(tok(s.description, add_special_tokens=False)["input_ids"]) + 1


def test_tower_targets_consistent_with_patch_labels():
    s = D.image_sample("train", 0, 2)
    y = T.tower_targets(s.scene)
    # each object's centre is in the base view once and in exactly one tile once
    assert y["centre"][0].sum() == y["centre"][1:].sum() == len(s.scene.objects)
    obj = y["color"] > 0
    assert np.all(y["shape"][obj] > 0) and np.all(np.abs(y["geom"][obj, 2:]) <= 1)
    assert np.all(y["geom"][~obj] == 0)


def _micro_recipe() -> T.Recipe:
    return T.Recipe(size="tiny", tower_steps=3, tower_batch=4, image_steps=3, image_batch=2, curriculum_steps=1,
                    joint_steps=2, joint_image_batch=1, joint_video_batch=1, video_steps=2, video_image_batch=1,
                    video_video_batch=1, warmup=1, eval_every=3, eval_images=2,
                    eval_clips=1, qas_per_image=3, qas_per_clip=3)


def test_smoke_training_writes_a_loadable_model(tmp_path):
    out = T.train(work_dir=tmp_path / "work", recipe=_micro_recipe(), progress=False, log=lambda s: None)
    log = [json.loads(x) for x in (tmp_path / "work" / "log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == set(T.STAGES)
    assert any("eval" in r and "video" in r["eval"] for r in log)
    assert all(np.isfinite(r["train"]["loss"]) for r in log if "train" in r)
    pipe = mmfast.pipeline("image-qa", model=str(out))
    s = D.image_sample("heldout", 0, 0)
    assert isinstance(pipe(image=s.image, question=s.questions[0].question, max_new_tokens=3)["answer"], str)
    with pytest.raises(mmfast.errors.MMFastError):  # refuses to overwrite a run without --resume
        T.train(work_dir=tmp_path / "work", recipe=_micro_recipe(), progress=False, log=lambda s: None)


@pytest.mark.parametrize("stage", ["image", "video"])
def test_checkpoint_resume_restores_model_and_optimizer(tmp_path, stage):
    r = _micro_recipe()
    tr = T._Trainer(r, tmp_path, log=lambda s: None, progress=False)
    tr.stage_i = T.STAGES.index(stage)
    tr._new_optimizer()
    for _ in range(2):
        tr._train_step()
        tr.step += 1
    tr.save()
    back = T._Trainer(r, tmp_path, log=lambda s: None, progress=False)
    assert back.load() and (back.stage, back.step) == (stage, 2)
    for (k, a), b in zip(tr.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(a, b), k
    pa = [p for g in tr.opt.param_groups for p in g["params"]]
    pb = [p for g in back.opt.param_groups for p in g["params"]]
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb):
        for key in tr.opt.state[x]:
            assert torch.equal(tr.opt.state[x][key], back.opt.state[y][key])
    # the next step is the same in both (deterministic data stream indexed by step)
    assert tr._train_step()["loss"] == pytest.approx(back._train_step()["loss"], rel=1e-4)


shipped = pytest.mark.skipif(not zoo.available().get("tiny-vlm"), reason="tiny-vlm checkpoint not trained yet")


@shipped
def test_shipped_checkpoint_is_small_and_answers_heldout_questions():
    path = zoo.zoo_path("tiny-vlm")
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 * 2**20
    pipe = mmfast.pipeline("image-qa")  # no model argument: the embedded default, offline
    hits = []
    for i in range(8):
        s = D.image_sample("heldout", 0, i)
        for qa in s.questions:
            hits.append(pipe(image=s.image, question=qa.question, max_new_tokens=4)["answer"] == qa.answer)
    assert np.mean(hits) >= 0.7, hits
    vid = mmfast.pipeline("video-qa")
    c = D.clip_sample("heldout", 0, 0)
    out = vid(video=c.frames, question=c.questions[0].question, max_new_tokens=4)
    assert out["stats"]["frames"] == T.NUM_FRAMES and out["stats"]["visual_tokens_in"] == T.VIDEO_TOKENS
    cap = mmfast.pipeline("image-caption")(image=D.image_sample("heldout", 0, 0).image, max_new_tokens=48)
    assert cap["caption"].split()[0] in D.SIZES


@pytest.mark.skipif(not zoo.available().get("tiny-vlm-flex"), reason="tiny-vlm-flex checkpoint not trained yet")
def test_shipped_flex_checkpoint_answers_with_a_quarter_of_the_tokens():
    from mmfast.train import tiny_vlm_flex as TF

    pipe = mmfast.pipeline("image-qa", model="tiny-vlm-flex", accelerate="tokenflex(keep=0.25)")
    hits = []
    for i in range(10):
        s = D.image_sample("heldout", 0, i)
        for qa in s.questions:
            out = pipe(image=s.image, question=qa.question, max_new_tokens=4)
            hits.append(out["answer"] == qa.answer)
    assert out["stats"]["visual_tokens_kept"] == TF.image_tokens(3) == 51  # 3 x 3 per crop, with the tile newlines
    assert np.mean(hits) >= 0.45, hits  # always-majority scores ~0.28


@shipped
def test_evaluate_vlm_reports_per_type_and_per_object_count_consistently():
    from mmfast.train.evaluate import evaluate_vlm, format_report

    res = evaluate_vlm(mmfast.pipeline("video-qa"), n_images=6, n_clips=2, progress=False)
    for mod, samples in (("image", D.image_dataset("heldout", 6)), ("video", D.video_dataset("heldout", 2))):
        by_n = res["by_objects"][mod]
        counts = [len(s.scene.objects) if mod == "image" else len(s.clip.tracks) for s in samples]
        per_sample = [len(s.questions) for s in samples]
        expect = {str(k): sum(q for c, q in zip(counts, per_sample, strict=True) if c == k) for k in set(counts)}
        assert {k: q for k, (_, q) in by_n.items()} == expect
        assert sum(q for _, q in by_n.values()) == res["n"][mod]
        overall = sum(a * q for a, q in by_n.values()) / res["n"][mod]
        assert overall == pytest.approx(res[mod]["overall"])
    assert "by number of objects" in format_report(res)


@shipped
def test_evaluate_vlm_hold_shows_each_frame_hold_times(monkeypatch):
    from mmfast.errors import ConfigError
    from mmfast.pipelines.video_qa import VideoQAPipeline
    from mmfast.train.evaluate import evaluate_vlm

    calls = []
    monkeypatch.setattr(VideoQAPipeline, "__call__", lambda self, **kw: calls.append(kw) or {"answer": "", "stats": {}})
    evaluate_vlm(mmfast.pipeline("video-qa"), n_images=0, n_clips=1, hold=3, progress=False)
    clip = np.asarray(D.clip_sample("heldout", 0, 0, num_frames=16).frames)
    assert calls and all(kw["num_frames"] == 48 for kw in calls)
    video = np.asarray(calls[0]["video"])
    assert video.shape == (48, *clip.shape[1:])
    for k in range(3):  # frame t is shown at 3t, 3t + 1, 3t + 2: the same events, three times as many frames
        np.testing.assert_array_equal(video[k::3], clip)
    with pytest.raises(ConfigError, match="hold"):
        evaluate_vlm(mmfast.pipeline("video-qa"), n_images=0, n_clips=1, hold=0, progress=False)


@shipped
def test_video_quality_long_variant_reports_frames_and_zipvl_ratio():
    from mmfast.bench.vlm import video_quality

    rows = video_quality(["zipvl(tau=1.0,mode='evict')", "zipvl(ratio=0.5)"], repeats=1, n_clips=1, num_frames=8, hold=2)
    base, full, half = rows
    assert [r["frames"] for r in rows] == [16, 16, 16]
    assert base["visual_tokens"] == 16 * 9 + 1  # 8 frames shown twice: 3 x 3 tokens per frame + the newline
    assert "important_ratio" not in base and full["important_ratio"] == 1.0
    assert half["important_ratio"] == pytest.approx(0.5, abs=0.01)
    assert full["accuracy"] == base["accuracy"]  # tau = 1 with eviction keeps every token: the baseline


@shipped
def test_quality_suites_take_another_checkpoint():
    """``--opt model=DIR``: the suite measures that checkpoint and names it in its rows."""
    from mmfast.bench.vlm import vlm_quality
    from mmfast.zoo import zoo_path

    path = str(zoo_path("tiny-vlm"))
    mine = vlm_quality(["pool(factor=2)"], repeats=1, n_images=2, model=path)
    ref = vlm_quality(["pool(factor=2)"], repeats=1, n_images=2)
    assert [r["model"] for r in mine] == [path, path] and [r["model"] for r in ref] == ["tiny-vlm", "tiny-vlm"]
    assert [r["accuracy"] for r in mine] == [r["accuracy"] for r in ref]


@shipped
def test_zoo_eval_cli_takes_clip_length_and_hold(tmp_path):
    from typer.testing import CliRunner

    from mmfast.cli import app
    from mmfast.errors import ConfigError

    out = tmp_path / "eval.json"
    args = ["zoo", "eval", "tiny-vlm", "--n", "1", "--n-clips", "1", "--num-frames", "8", "--hold", "2", "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "8 frames x 2" in res.output
    got = json.loads(out.read_text())
    assert (got["num_frames"], got["hold"]) == (8, 2)
    assert got["n"]["video"] == len(D.clip_sample("heldout", 0, 0, num_frames=8).questions)
    bad = CliRunner().invoke(app, ["zoo", "eval", "tiny-vlm", "--n", "0", "--n-clips", "1", "--hold", "0"])
    assert isinstance(bad.exception, ConfigError) and "hold must be an integer >= 1" in str(bad.exception)
