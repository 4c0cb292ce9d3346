"""Tests of mmfast.media on real files: gradio's sample videos, videos synthesised with PyAV, damaged copies.

No decoder is mocked: corrupt inputs go through the real decord / PyAV / PIL code paths.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from mmfast import media
from mmfast.errors import InvalidInputError
from mmfast.media import (
    Video,
    is_video_path,
    load_image,
    load_video,
    sample_indices_fps,
    sample_indices_uniform,
)

BACKENDS = ["decord", "pyav"]
SYN_FRAMES, SYN_W, SYN_H = 24, 64, 48


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def gradio_videos() -> Path:
    # find_spec locates the package without importing it (importing gradio takes seconds)
    spec = importlib.util.find_spec("gradio")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gradio is not installed")
    folder = Path(spec.submodule_search_locations[0], "media_assets", "videos")
    if not (folder / "world.mp4").is_file():
        pytest.skip("gradio's sample videos are missing")
    return folder


def _write_video(path: Path, codec: str, n: int = SYN_FRAMES, pix_fmt: str = "yuv420p", **options: str) -> Path:
    """Frame i is a flat grey of brightness 10 * i, so order can be checked after lossy coding."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=24, options=options)
        stream.width, stream.height, stream.pix_fmt = SYN_W, SYN_H, pix_fmt
        for i in range(n):
            frame = np.full((SYN_H, SYN_W, 3), 10 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="session")
def syn_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_video(tmp_path_factory.mktemp("video") / "ramp.mp4", "libx264", crf="10")


@pytest.fixture(scope="session")
def damaged(tmp_path_factory: pytest.TempPathFactory, gradio_videos: Path) -> dict[str, Path]:
    """Broken video files, by name."""
    folder = tmp_path_factory.mktemp("damaged")
    world = (gradio_videos / "world.mp4").read_bytes()  # index (moov) first: a cut keeps the frame table
    b_mp4 = (gradio_videos / "b.mp4").read_bytes()  # index last: a cut loses it
    b_avi = (gradio_videos / "b.avi").read_bytes()
    rng = np.random.default_rng(0)
    contents = {
        "empty.mp4": b"",
        "random.mp4": rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
        "text.mp4": b"this is not a video\n" * 500,
        "world_first10pct.mp4": world[: len(world) // 10],
        "world_first_half.mp4": world[: len(world) // 2],
        "b_first_half.mp4": b_mp4[: len(b_mp4) // 2],
        "b_first10pct.mp4": b_mp4[: len(b_mp4) // 10],
        "b_first_half.avi": b_avi[: len(b_avi) // 2],
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    # a valid container whose video stream has no frame (only audio is muxed), and an audio-only file
    for name, with_video in [("no_frames.mkv", True), ("audio.wav", False)]:
        paths[name] = folder / name
        with av.open(str(paths[name]), "w") as container:
            if with_video:
                video = container.add_stream("mpeg4", rate=24)
                video.width, video.height = SYN_W, SYN_H
            audio = container.add_stream("pcm_s16le", rate=8000, layout="mono")
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate = 8000
            container.mux(audio.encode(frame))
            container.mux(audio.encode())
    return paths


def _brightness(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(len(frames), -1).mean(axis=1)


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_indices_uniform_is_rounded_linspace() -> None:
    np.testing.assert_array_equal(sample_indices_uniform(901, 8), [0, 129, 257, 386, 514, 643, 771, 900])
    for total, n in [(1, 1), (10, 1), (10, 10), (150, 16), (7, 3)]:
        expected = np.linspace(0, total - 1, n).round().astype(int)
        np.testing.assert_array_equal(sample_indices_uniform(total, n), expected)
    np.testing.assert_array_equal(sample_indices_uniform(3, 5), [0, 0, 1, 2, 2])  # keeps n, repeats frames
    for total, n in [(0, 4), (10, 0), (10, -1)]:
        with pytest.raises(InvalidInputError):
            sample_indices_uniform(total, n)


def test_sample_indices_fps() -> None:
    np.testing.assert_array_equal(sample_indices_fps(150, 30.0, 2.0, None), np.arange(0, 150, 15))
    # same as transformers.video_utils.default_sample_indices_fn: n = int(total / src_fps * fps)
    total, n = 901, int(901 / 30 * 1.5)
    np.testing.assert_array_equal(sample_indices_fps(total, 30.0, 1.5, None), np.arange(n) * total // n)
    np.testing.assert_array_equal(sample_indices_fps(150, 30.0, 2.0, 4), sample_indices_uniform(150, 4))
    np.testing.assert_array_equal(sample_indices_fps(10, 30.0, 60.0, None), np.arange(10))  # never > all frames
    np.testing.assert_array_equal(sample_indices_fps(3, 30.0, 0.01, None), [0])  # at least one frame
    for args in [(150, 0.0, 2.0, None), (150, 30.0, -1.0, None), (150, 30.0, float("nan"), None), (150, 30, 2, 0)]:
        with pytest.raises(InvalidInputError):
            sample_indices_fps(*args)


def test_is_video_path() -> None:
    for name in ["a.mp4", "b.AVI", "c.mov", "d.mkv", "e.webm", "f.gif", "g.m4v", Path("x/y.mp4")]:
        assert is_video_path(name), name
    for name in ["a.png", "a.jpg", "mp4", "", b"a.mp4", None, 3]:
        assert not is_video_path(name), name


# ------------------------------------------------------------------------------------------------ real videos


@pytest.mark.parametrize("backend", BACKENDS)
def test_world_mp4_num_frames(gradio_videos: Path, backend: str) -> None:
    video = load_video(gradio_videos / "world.mp4", num_frames=8, backend=backend)
    assert isinstance(video, Video) and len(video) == 8
    assert video.frames.shape == (8, 270, 480, 3) and video.frames.dtype == np.uint8
    np.testing.assert_array_equal(video.indices, sample_indices_uniform(901, 8))
    np.testing.assert_allclose(video.timestamps, video.indices / 30, atol=1e-3)
    assert video.fps == pytest.approx(30) and video.total_frames == 901
    assert video.duration == pytest.approx(30.5, abs=0.1)
    assert video.source.endswith("world.mp4")
    assert video.frames.max() > 200 and np.ptp(_brightness(video.frames)) > 1  # real, differing pictures
    images = video.to_pil()
    assert len(images) == 8 and images[0].mode == "RGB" and images[0].size == (480, 270)


@pytest.mark.parametrize("name", ["world.mp4", "b.avi"])
def test_backends_agree(gradio_videos: Path, name: str) -> None:
    by_decord = load_video(gradio_videos / name, num_frames=6, backend="decord")
    by_pyav = load_video(gradio_videos / name, num_frames=6, backend="pyav")
    np.testing.assert_array_equal(by_decord.indices, by_pyav.indices)
    np.testing.assert_array_equal(by_decord.timestamps, by_pyav.timestamps)
    assert np.abs(by_decord.frames.astype(int) - by_pyav.frames.astype(int)).max() <= 2


@pytest.mark.parametrize("name", ["b.mp4", "b.avi"])
def test_fps_sampling(gradio_videos: Path, name: str) -> None:
    video = load_video(gradio_videos / name, fps=2)  # 5 s at 30 fps
    assert video.total_frames == 150  # b.avi's header says 151: one dropped-frame slot
    np.testing.assert_array_equal(video.indices, np.arange(0, 150, 15))
    assert len(video) == 10 and video.frames.shape[1:] == (270, 480, 3)
    assert np.diff(video.timestamps) == pytest.approx(0.5, abs=0.04)
    capped = load_video(gradio_videos / name, fps=2, max_frames=4)
    np.testing.assert_array_equal(capped.indices, sample_indices_uniform(150, 4))


@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_frames_in_order(syn_mp4: Path, backend: str) -> None:
    video = load_video(syn_mp4, backend=backend)
    assert video.frames.shape == (SYN_FRAMES, SYN_H, SYN_W, 3)
    np.testing.assert_array_equal(video.indices, np.arange(SYN_FRAMES))
    np.testing.assert_allclose(_brightness(video.frames), 10 * np.arange(SYN_FRAMES), atol=3)
    np.testing.assert_allclose(video.timestamps, np.arange(SYN_FRAMES) / 24, atol=1e-6)
    sampled = load_video(str(syn_mp4), num_frames=5, backend=backend)
    np.testing.assert_allclose(_brightness(sampled.frames), 10 * sampled.indices, atol=3)


def test_video_bytes_and_caps(syn_mp4: Path) -> None:
    video = load_video(syn_mp4.read_bytes(), max_frames=6)
    np.testing.assert_array_equal(video.indices, sample_indices_uniform(SYN_FRAMES, 6))
    np.testing.assert_allclose(_brightness(video.frames), 10 * video.indices, atol=3)
    assert video.source.startswith("<") and video.fps == pytest.approx(24)
    assert len(load_video(syn_mp4, num_frames=10, max_frames=3)) == 3


def test_gif_goes_to_pyav(tmp_path: Path) -> None:
    gif = _write_video(tmp_path / "ramp.gif", "gif", n=6, pix_fmt="rgb8")
    video = load_video(gif, num_frames=3)
    assert video.frames.shape == (3, SYN_H, SYN_W, 3)
    assert np.all(np.diff(_brightness(video.frames)) > 5)
    with pytest.raises(InvalidInputError, match="GIF"):
        load_video(gif, backend="decord")


# ------------------------------------------------------------------------------------------------ frames given


def test_frames_given_directly() -> None:
    frames = np.stack([np.full((8, 10, 3), 10 * i, np.uint8) for i in range(12)])
    from_array = load_video(frames, num_frames=4)
    np.testing.assert_array_equal(from_array.indices, [0, 4, 7, 11])
    np.testing.assert_array_equal(from_array.frames, frames[[0, 4, 7, 11]])
    assert from_array.fps is None and np.isnan(from_array.timestamps).all() and from_array.total_frames == 12

    from_list = load_video([Image.fromarray(f) for f in frames], num_frames=4)
    np.testing.assert_array_equal(from_list.frames, from_array.frames)
    from_floats = load_video(list(frames / 255.0), fps=2, source_fps=6)
    np.testing.assert_array_equal(from_floats.indices, [0, 3, 6, 9])
    np.testing.assert_allclose(from_floats.timestamps, [0, 0.5, 1, 1.5])
    np.testing.assert_array_equal(from_floats.frames, frames[[0, 3, 6, 9]])
    with pytest.raises(InvalidInputError, match="source_fps"):
        load_video(frames, fps=2)


def test_frames_from_torch() -> None:
    torch = pytest.importorskip("torch")
    frames = np.random.default_rng(0).integers(0, 256, (5, 8, 10, 3), dtype=np.uint8)
    chw = torch.from_numpy(frames).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(load_video(chw).frames, frames)
    np.testing.assert_array_equal(load_video(torch.from_numpy(frames).float() / 255).frames, frames)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        (),
        [np.zeros((8, 10, 3), np.uint8), np.zeros((8, 12, 3), np.uint8)],  # sizes differ
        [np.zeros((8, 10, 3), np.uint8), "missing-frame.png"],
        np.zeros((0, 8, 10, 3), np.uint8),
        np.zeros((2, 8, 10), np.uint8),
        np.zeros((2, 8, 10, 4), np.uint8),
        np.zeros((1, 8, 17_000, 3), np.uint8),
        np.full((2, 8, 10, 3), np.nan),
        np.full((2, 8, 10, 3), 255.0),
        {"frames": []},
    ],
    ids=lambda x: type(x).__name__ + str(getattr(x, "shape", len(x) if isinstance(x, (list, tuple)) else "")),
)
def test_bad_frames(frames: object) -> None:
    with pytest.raises(InvalidInputError):
        load_video(frames)


# ------------------------------------------------------------------------------------------------ bad videos


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("empty.mp4", "is empty"),
        ("random.mp4", "not a readable video"),
        ("text.mp4", "not a readable video"),
        # A cut file is an error, not a shorter video: its header promises frames it does not hold, and
        # answering about the first 10 % of a video as if it were all of it would be silently wrong.
        ("world_first10pct.mp4", "is truncated"),
        ("world_first_half.mp4", "is truncated"),
        ("b_first_half.avi", "is truncated"),
        ("b_first_half.mp4", "not a readable video"),  # the cut removed the index: nothing to open
        ("b_first10pct.mp4", "not a readable video"),
        ("no_frames.mkv", "no video frames"),
        ("audio.wav", "no video stream"),
    ],
)
@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_damaged_video_files(damaged: dict[str, Path], name: str, reason: str, backend: str | None) -> None:
    with pytest.raises(InvalidInputError, match=reason) as info:
        load_video(damaged[name], num_frames=4, backend=backend)
    assert name in str(info.value)
    with pytest.raises(InvalidInputError, match=reason.replace("is empty", "empty")):
        load_video(damaged[name].read_bytes(), num_frames=4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cut_container_without_frame_count_loads_what_is_there(tmp_path: Path, backend: str) -> None:
    """An mkv has no frame count to betray a cut: it loads as the shorter video it now is, never garbage."""
    data = _write_video(tmp_path / "ramp.mkv", "mpeg4", qmax="2").read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    video = load_video(cut, backend=backend)
    assert 0 < video.total_frames < SYN_FRAMES
    np.testing.assert_array_equal(video.indices, np.arange(video.total_frames))
    np.testing.assert_allclose(_brightness(video.frames), 10 * video.indices, atol=3)


def test_damaged_files_never_kill_the_process(damaged: dict[str, Path], gradio_videos: Path) -> None:
    """decord is native code: run it on every damaged file in a child, so a crash fails this test only."""
    world = (gradio_videos / "world.mp4").read_bytes()
    garbled = bytearray(world)
    garbled[400_000:700_000] = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    garbled_path = damaged["empty.mp4"].with_name("world_garbled.mp4")
    garbled_path.write_bytes(bytes(garbled))
    paths = [*map(str, damaged.values()), str(garbled_path)]
    code = textwrap.dedent(
        f"""
        from mmfast.media import load_video
        from mmfast.errors import InvalidInputError
        for path in {paths!r}:
            for backend in (None, "decord"):
                try:
                    load_video(path, num_frames=8, backend=backend)
                except InvalidInputError:
                    pass
        print("survived")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "survived"


def test_bad_video_arguments(syn_mp4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_video(tmp_path / "missing.mp4")
    with pytest.raises(InvalidInputError, match="directory"):
        load_video(tmp_path)
    with pytest.raises(InvalidInputError, match="empty"):
        load_video(b"")
    with pytest.raises(InvalidInputError, match="not a readable video"):
        load_video(b"\x00\x01garbage" * 100)
    with pytest.raises(InvalidInputError, match="URL"):
        load_video("https://example.com/video.mp4")
    with pytest.raises(InvalidInputError, match="not both"):
        load_video(syn_mp4, num_frames=4, fps=2)
    for kwargs in [{"num_frames": 0}, {"num_frames": -3}, {"num_frames": 2.5}, {"fps": 0}, {"max_frames": 0}]:
        with pytest.raises(InvalidInputError):
            load_video(syn_mp4, **kwargs)
    with pytest.raises(InvalidInputError, match="backend"):
        load_video(syn_mp4, backend="opencv")
    with pytest.raises(InvalidInputError, match="source_fps"):
        load_video(syn_mp4, source_fps=30)
    with pytest.raises(InvalidInputError, match="Unsupported video type"):
        load_video(12345)

    monkeypatch.setattr(media, "MAX_IMAGE_SIDE", 32)  # as if the file's frames were 16k wide
    with pytest.raises(InvalidInputError, match="64x48"):
        load_video(syn_mp4)
    monkeypatch.undo()
    monkeypatch.setattr(media, "MAX_VIDEO_BYTES", SYN_W * SYN_H * 3 * 10)  # as if the video were hours long
    with pytest.raises(InvalidInputError, match="num_frames"):
        load_video(syn_mp4)
    assert len(load_video(syn_mp4, num_frames=10)) == 10


# ------------------------------------------------------------------------------------------------ images


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_inputs_agree(rgb: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    path.write_bytes(_png(rgb))
    rgba = np.concatenate([rgb, np.full((30, 40, 1), 255, np.uint8)], axis=-1)
    sources = {
        "str": str(path),
        "path": path,
        "bytes": path.read_bytes(),
        "pil": Image.fromarray(rgb),
        "pil_lazy": Image.open(path),
        "pil_rgba": Image.fromarray(rgba),
        "uint8": rgb,
        "float": rgb / 255.0,
        "float32_rgba": rgba.astype(np.float32) / 255,
        "non_contiguous": np.asfortranarray(rgb),
    }
    for name, src in sources.items():
        image = load_image(src)
        assert isinstance(image, Image.Image) and image.mode == "RGB", name
        np.testing.assert_array_equal(np.asarray(image), rgb, err_msg=name)


def test_image_from_torch(rgb: np.ndarray) -> None:
    torch = pytest.importorskip("torch")
    for tensor in [torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(rgb).double() / 255]:
        np.testing.assert_array_equal(np.asarray(load_image(tensor)), rgb)
    from_bfloat16 = np.asarray(load_image(torch.from_numpy(rgb).bfloat16() / 255)).astype(int)
    assert np.abs(from_bfloat16 - rgb).max() <= 1  # bfloat16 keeps 8 significant bits


def test_image_modes() -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for src in (gray, gray[..., None], Image.fromarray(gray)):
        np.testing.assert_array_equal(np.asarray(load_image(src)), np.repeat(gray[..., None], 3, axis=-1))
    transparent = np.zeros((2, 2, 4), np.uint8)  # black, fully transparent: composited on white
    assert np.asarray(load_image(transparent)).min() == 255


def test_image_exif_rotation() -> None:
    array = np.zeros((10, 20, 3), np.uint8)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image(buffer.getvalue()).size == (10, 20)


@pytest.fixture(scope="module")
def bad_image_files(rgb: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_images")
    png = _png(rgb)
    jpeg_buffer = io.BytesIO()
    Image.fromarray(rgb).save(jpeg_buffer, format="JPEG")
    jpeg = jpeg_buffer.getvalue()
    contents = {
        "truncated.png": png[: len(png) // 2],
        "truncated_90pct.png": png[: len(png) * 9 // 10],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "header_only.jpg": jpeg[:100],
        "random.png": np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "text.png": b"not an image\n" * 50,
        "empty.png": b"",
        "video.mp4": b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100,
    }
    paths = {}
    for name, data in contents.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    return paths


@pytest.mark.parametrize(
    "name",
    [
        "truncated.png",
        "truncated_90pct.png",
        "truncated.jpg",
        "header_only.jpg",
        "random.png",
        "text.png",
        "empty.png",
        "video.mp4",
    ],
)
def test_bad_image_files(bad_image_files: dict[str, Path], name: str) -> None:
    with pytest.raises(InvalidInputError, match=name):
        load_image(bad_image_files[name])
    if name != "empty.png":
        with pytest.raises(InvalidInputError):
            load_image(bad_image_files[name].read_bytes())


@pytest.mark.parametrize(
    "src",
    [
        np.zeros((1, 70_000, 3), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
        np.zeros((10, 0), np.uint8),
        np.zeros((0,), np.uint8),
        np.zeros((4, 4, 2), np.uint8),
        np.zeros((2, 4, 4, 3), np.uint8),
        np.full((4, 4, 3), np.nan, np.float32),
        np.full((4, 4, 3), np.inf),
        np.full((4, 4, 3), 255.0),
        np.full((4, 4, 3), -0.5),
        np.zeros((4, 4, 3), np.int64),
        np.zeros((4, 4, 3), bool),
        b"",
        42,
        None,
        ["a.png"],
    ],
    ids=lambda x: type(x).__name__ + str(getattr(x, "shape", "")) + str(getattr(x, "dtype", "")),
)
def test_bad_image_values(src: object) -> None:
    with pytest.raises(InvalidInputError):
        load_image(src)


def test_image_size_limits(rgb: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="directory"):
        load_image(tmp_path)
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 1000)  # 30 x 40 = 1200 pixels: a "bomb"
    for src in (_png(rgb), rgb, Image.fromarray(rgb)):
        with pytest.raises(InvalidInputError, match="megapixels"):
            load_image(src)


def test_media_kind_reads_content_not_extension(tmp_path):
    from PIL import Image

    from mmfast.media import media_kind

    vid = _write_video(tmp_path / "clip.mp4", "mpeg4")
    renamed = tmp_path / "clip.bin"
    renamed.write_bytes(vid.read_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    (tmp_path / "photo.dat").write_bytes((tmp_path / "photo.png").read_bytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert media_kind(vid) == media_kind(renamed) == "video"
    assert media_kind(tmp_path / "photo.png") == media_kind(tmp_path / "photo.dat") == "image"
    assert media_kind(tmp_path / "empty.mp4") == "video"  # unreadable: by extension, the loader says what is wrong
    assert media_kind("https://example.com/a.mp4") == "video"
