"""streaming-video-qa: the full cache equals one-shot video-qa on every video family, VideoScan's cache equals the
view tiny-vlm-scan is trained on, the memory bank, the baselines, and bad input."""

from __future__ import annotations

from pathlib import Path

import gradio
import numpy as np
import pytest
import torch

import mmfast
from mmfast.accel.videoscan import VideoScan
from mmfast.errors import IncompatibleAcceleratorError, InvalidInputError
from mmfast.models.stream import FrameContext
from mmfast.train.tiny_models import VIDEO_FAMILIES, make_test_image, make_test_video

pytestmark = pytest.mark.usefixtures("one_thread")
Q = "What is this?"
GEN = {"max_new_tokens": 6}


def _session(vlm_pipes, family, accelerate=None, **kw):
    img, _ = vlm_pipes[family]
    return mmfast.pipeline("streaming-video-qa", model=(img.model, img.processor), accelerate=accelerate, **kw)


@pytest.mark.parametrize("family", ["llava", *VIDEO_FAMILIES])
def test_full_cache_stream_equals_one_shot_video_qa(vlm_pipes, family):
    img, vid = vlm_pipes[family]
    vid = vid or mmfast.pipeline("video-qa", model=(img.model, img.processor))
    s = _session(vlm_pipes, family)
    frames = make_test_video(8, seed=1)
    s.push(frames[:3])  # an array of frames, then one frame, then a list
    s.push(frames[3])
    s.push(list(frames[4:]))
    before = s.state
    out = s.ask(Q, **GEN)
    one = vid(video=frames, question=Q, num_frames=8, **GEN)
    assert out["answer"] == one["answer"]
    assert s.ask(Q, **GEN)["answer"] == out["answer"]  # asking leaves the stream as it was
    assert {k: s.state[k] for k in ("tokens_held", "kv_bytes")} == {k: before[k] for k in ("tokens_held", "kv_bytes")}
    # the cache holds exactly the one-shot prompt minus its question part
    assert before["tokens_held"] < one["stats"]["prompt_tokens"] and before["frames_seen"] == 8
    s.push(make_test_video(2, seed=3))  # the stream goes on: the answer now covers 10 frames
    both = np.concatenate([frames, make_test_video(2, seed=3)])
    assert s.ask(Q, **GEN)["answer"] == vid(video=both, question=Q, num_frames=10, **GEN)["answer"]


def test_videoscan_cache_is_the_view_tiny_vlm_scan_is_trained_on(tmp_path):
    """The stream's cache after T frames (prefix + T carriers) equals the keys / values the training forward
    computes for those positions with the carrier mask and the compacted positions."""
    from transformers import DynamicCache

    from mmfast.train import tiny_vlm as T
    from mmfast.train import tiny_vlm_scan as S

    model, processor = T.build_model("tiny", seed=0), T.build_processor()
    T.save_model(model, processor, tmp_path, dtype="float32")
    s = mmfast.pipeline("streaming-video-qa", model=str(tmp_path), accelerate="videoscan")
    frames = make_test_video(5, size=T.TOWER_SIZE, seed=2)
    s.push(frames)
    stream = s._stream
    m = s.model
    builder = T.SequenceBuilder(processor.tokenizer)
    ids, _ = builder.encode([(Q, "yes")], "video", S.scan_placeholders(5))
    ids = torch.tensor(ids)
    with torch.no_grad():
        feats = T.video_features(m, T.video_pixels(frames[None]), tower_grad=False)[0]
        seq, pos, region, carrier = S.scan_sequence(ids, m.config.video_token_index, feats[:-1].reshape(5, 9, -1),
                                                    feats[-1:])
        cache = DynamicCache()
        m.model.language_model(inputs_embeds=T._embed(m, ids[None], seq, m.config.video_token_index),
                               attention_mask=S.scan_mask(region, carrier, len(ids), torch.float32)[None],
                               position_ids=pos[None], past_key_values=cache, use_cache=True)
    keep = (region < 0) | carrier
    assert int(keep.sum()) == stream.cache.stored == len(stream.layout.prefix) + 5
    for got, want in zip(stream.cache.layers, cache.layers):
        torch.testing.assert_close(got.keys, want.keys[:, :, keep], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got.values, want.values[:, :, keep], atol=2e-5, rtol=1e-4)


def test_videoscan_memory_bank_evicts_the_earlier_of_the_most_similar_pair():
    vs = VideoScan(memory=3)
    e = torch.eye(4)
    bank = [(0, e[0]), (1, e[1]), (2, e[1] + 0.1 * e[2])]  # carriers 1 and 2 look alike
    scratch = {"videoscan_bank": list(bank)}
    # cache: prefix (2 entries), carriers of frames 0-2, then frame 3's two tokens and its carrier
    groups = torch.tensor([-1, -1, 0, 1, 2, 3, 3, 3])
    ctx = FrameContext(frame=3, start=5, length=3, inputs=torch.stack([e[3], e[3], e[3]]),
                       visual=torch.tensor([True, True, False]), groups=groups, cache=None, scratch=scratch)
    keep = vs.after_frame(ctx)
    assert keep.tolist() == [0, 1, 2, 4, 7]  # frame 1's carrier evicted (the earlier of the pair), frame 3's kept
    assert [f for f, _ in scratch["videoscan_bank"]] == [0, 2, 3]


def test_videoscan_memory_stays_flat_and_add_kv_keeps_frame_tokens(vlm_pipes):
    s = _session(vlm_pipes, "llava_onevision", "videoscan(memory=4)")
    kv = []
    for f in make_test_video(10, seed=4):
        kv.append(s.push(f)["kv_bytes"])
    prefix = s.state["tokens_held"] - 4
    assert s.state["carriers_held"] == 4 and kv[3] == kv[9] and len(set(kv[3:])) == 1  # bank full: flat
    assert isinstance(s.ask(Q, **GEN)["answer"], str)
    s2 = _session(vlm_pipes, "llava_onevision", "videoscan(add_kv=3)")
    s2.push(make_test_video(4, seed=4))
    assert s2.state["tokens_held"] == prefix + 4 * (1 + 3)
    q = _session(vlm_pipes, "qwen2_vl", "videoscan(memory=64)")
    q.push(make_test_video(6, seed=4))  # Qwen: one carrier per temporal patch of 2 frames
    assert q.state["carriers_held"] == 3 and isinstance(q.ask(Q, **GEN)["answer"], str)


def test_kv_window_and_reprefill_baselines(vlm_pipes):
    s = _session(vlm_pipes, "llava_next_video", "kv_window(sink=4,recent=20)")
    s.push(make_test_video(6, seed=5))
    assert s.state["tokens_held"] == 24 and s.ask(Q, **GEN)["stats"]["new_tokens"] == 6
    r = _session(vlm_pipes, "llava_onevision", strategy="reprefill", num_frames=4)
    frames = make_test_video(8, seed=5)
    r.push(frames)
    _, vid = vlm_pipes["llava_onevision"]
    assert r.ask(Q, **GEN)["answer"] == vid(video=frames, question=Q, num_frames=4, **GEN)["answer"]
    assert r.state["frames_held"] == 8


def test_feed_decodes_incrementally(vlm_pipes):
    s = _session(vlm_pipes, "llava_onevision", "videoscan")
    world = Path(gradio.__file__).parent / "media_assets" / "videos" / "world.mp4"
    seen = []
    n = s.feed(world, fps=1.0, max_frames=5, callback=lambda sess, k: seen.append(sess.state["carriers_held"]))
    assert n == 5 and seen == [1, 2, 3, 4, 5]
    with pytest.raises(InvalidInputError, match="one frame size"):  # frames of another size: refused
        s.feed(make_test_video(3, seed=6), fps=None)
    assert s.state["frames_seen"] == 5
    s.reset()
    assert s.feed(iter(make_test_video(3, seed=6)), fps=None) == 3 and s.state["frames_seen"] == 3


def test_bad_input_keeps_the_session_usable(vlm_pipes, tmp_path):
    s = _session(vlm_pipes, "llava_onevision")
    with pytest.raises(InvalidInputError, match="before any frame"):
        s.ask(Q)
    for bad in (np.zeros((0, 32, 32, 3), np.uint8), [], None, "not an image"):
        with pytest.raises(InvalidInputError):
            s.push(bad)
    s.push(make_test_video(2, seed=7))
    with pytest.raises(InvalidInputError, match="one frame size"):
        s.push([make_test_image(0, size=64), make_test_image(1, size=(64, 32))])
    assert s.state["frames_seen"] == 2  # the bad batch pushed nothing
    cut = tmp_path / "cut.mp4"  # a stream that ends mid-frame: the frames decoded so far stay
    import av

    with av.open(str(cut), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in make_test_video(8, seed=8):
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    try:
        s.feed(cut, fps=None)
    except InvalidInputError:
        pass
    assert s.state["frames_seen"] >= 2 and isinstance(s.ask(Q, **GEN)["answer"], str)
    with pytest.raises(IncompatibleAcceleratorError, match="cannot act on a stream"):
        _session(vlm_pipes, "llava_onevision", "lookm")
    with pytest.raises(IncompatibleAcceleratorError):
        _session(vlm_pipes, "llava_onevision", "videoscan", strategy="reprefill")
    with pytest.raises(IncompatibleAcceleratorError, match="video_stream"):
        _session(vlm_pipes, "llava_next", "videoscan")
