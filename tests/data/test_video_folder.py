"""Video folders through the on-disk cache: clip records equal the decoded frames, frame-rate resampling, frame
folders, labels, broken and short videos, and a folder that changes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.data import DataError
from selfsup.data.cache import CacheOptions, prepare_folder
from selfsup.data.manifest import Manifest
from selfsup.data.video_decode import natural_key, resample
from selfsup.data.video_folder import load_video_folder, video_source

av = pytest.importorskip("av")

S = 32  # image_size 24 → stored side round(24 × 4/3) = 32
PAST_NS = 1_577_836_800 * 10**9


def _frame(i: int, w: int = S, h: int = S) -> np.ndarray:
    """Frame i: red = 8·i everywhere (the index is readable from any pixel), a green square moving right."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 8 * i % 256
    x = (2 * i) % (w - 6)
    a[4:10, x : x + 6, 1] = 255
    return a


def _video(path: Path, n: int, rate: int = 30, w: int = S, h: int = S, codec: str = "ffv1",
           pix_fmt: str = "bgr0") -> list[np.ndarray]:
    """``n`` frames of :func:`_frame`; ffv1 (in .mkv) is lossless, so the records can be compared exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [_frame(i, w, h) for i in range(n)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for a in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())
    return frames


def _frames_dir(folder: Path, n: int, gray: bool = False, names=lambda i: f"{i:05d}.png") -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    frames = [_frame(i) for i in range(n)]
    for i, a in enumerate(frames):
        Image.fromarray(a[..., 0] if gray else a).save(folder / names(i))
    return frames


def _load(folder: Path, tmp_path: Path, **kw):
    kw.setdefault("frames_per_record", 4)
    kw.setdefault("fps", 30)
    return load_video_folder(folder, 24, cache_dir=str(tmp_path / "cache"), progress=False, **kw)


def _frames_of(record: torch.Tensor, channels: int = 3) -> np.ndarray:
    """(L·C, S, S) → (L, S, S, C)."""
    return record.reshape(-1, channels, S, S).permute(0, 2, 3, 1).numpy()


def test_records_equal_the_decoded_frames(tmp_path):
    frames = _video(tmp_path / "v" / "a.mkv", 10)
    clips, meta = _load(tmp_path / "v", tmp_path)
    assert len(clips) == 2 and clips.batch([0]).shape == (1, 12, S, S)  # 10 frames: two records of 4, a tail of 2
    assert clips.labels is None and clips.paths == [str(tmp_path / "v" / "a.mkv")] * 2
    for r in range(2):
        assert np.array_equal(_frames_of(clips.batch([r])[0]), np.stack(frames[4 * r : 4 * r + 4]))
    assert meta["video"].tolist() == [0, 0] and meta["start"].tolist() == pytest.approx([0.0, 4 / 30])
    assert meta["valid"].tolist() == [4, 4] and meta["frames"] == 4 and meta["channels"] == 3
    assert meta["video"].dtype == torch.int64 and torch.allclose(clips.aspect, torch.ones(2))


@pytest.mark.parametrize("fps, picks", [(10, [0, 3, 6, 9, 12, 15, 18, 21]), (15, [0, 2, 4, 6, 8, 10, 12, 14]),
                                        (25, [0, 1, 2, 4, 5, 6, 7, 8]), (45, [0, 1, 1, 2, 3, 3, 4, 5])])
def test_the_frame_rate_is_resampled_by_timestamp(tmp_path, fps, picks):
    """30 fps to ``fps``: output frame t is the source frame nearest in time to t/fps (ties: the earlier)."""
    frames = _video(tmp_path / "v" / "a.mkv", 48)
    clips, meta = _load(tmp_path / "v", tmp_path, frames_per_record=8, fps=fps)
    assert len(clips) == round(48 / 30 * fps) // 8
    assert np.array_equal(_frames_of(clips.batch([0])[0]), np.stack([frames[i] for i in picks]))
    assert meta["start"][1].item() == pytest.approx(8 / fps)


def test_resample_follows_timestamps_not_frame_counts():
    """Rounded timestamps (Matroska's milliseconds) and a dropped frame: the nearest frame in time is shown."""
    times = [0.0, 0.033, 0.067, 0.1, 0.2, 0.233]  # 30 fps with frames 4-5 (0.133, 0.167) missing
    assert list(resample(zip(times, range(6)), 30, 1 / 30)) == [0, 1, 2, 3, 3, 4, 4, 5]
    assert list(resample([(5.0, "a"), (5.5, "b")], 4, 0.5)) == ["a", "a", "b", "b"]  # times count from the first
    assert list(resample([(None, "a")], 10, 0.25)) == ["a", "a", "a"]
    exact = [(i / 30, i) for i in range(4)]  # twice the rate: every other output time is a tie, to the earlier
    assert list(resample(exact, 60, 1 / 30)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_lossy_video_resized_with_a_tolerance(tmp_path):
    """An mpeg4 64×48 video squashed to S×S: each record frame's red level says which frame it is."""
    _video(tmp_path / "v" / "a.mp4", 12, w=64, h=48, codec="mpeg4", pix_fmt="yuv420p")
    clips, _ = _load(tmp_path / "v", tmp_path, fps=15)
    assert len(clips) == 1 and clips.aspect.tolist() == pytest.approx([64 / 48])
    red = _frames_of(clips.batch([0])[0])[:, 16:, :, 0].astype(float).mean(axis=(1, 2))  # below the square
    assert np.abs(red - 8 * np.arange(0, 8, 2)).max() < 6


def test_frame_folders_and_class_folders(tmp_path):
    """Videos and frame folders side by side under class folders; frames sort with numbers as numbers."""
    root = tmp_path / "v"
    _video(root / "cat" / "one.mkv", 8)
    frames = _frames_dir(root / "dog" / "walk", 10, names=lambda i: f"frame{i}.png")  # frame2 before frame10
    _frames_dir(root / "dog" / "deep" / "run", 4)
    clips, meta = _load(root, tmp_path)
    assert clips.classes == ["cat", "dog"] and clips.labels.tolist() == [0, 0, 1, 1, 1]
    assert [Path(p).name for p in meta["paths"]] == ["one.mkv", "run", "walk"]
    assert meta["video"].tolist() == [0, 0, 1, 2, 2] and meta["records"].tolist() == [2, 1, 2]
    walk = clips.batch([3, 4])
    assert np.array_equal(_frames_of(walk[1]), np.stack(frames[4:8]))
    assert sorted(["frame10.png", "frame2.png"], key=natural_key) == ["frame2.png", "frame10.png"]


def test_unlabelled_gray_frame_folders(tmp_path):
    """Clips directly in the root: unlabelled. All-gray frames are stored with one channel per frame."""
    frames = _frames_dir(tmp_path / "v" / "clip", 5, gray=True)
    _frames_dir(tmp_path / "v" / "other", 4, gray=True)
    clips, meta = _load(tmp_path / "v", tmp_path, frame_fps=15, fps=30)  # frames taken at 15 fps: each shown twice
    assert clips.labels is None and clips.classes == [] and meta["channels"] == 1
    assert clips.batch([0]).shape == (1, 4, S, S) and len(clips) == 4  # 5 frames at 15 fps = 10 at 30: two records
    assert np.array_equal(clips.batch([1])[0].numpy(), np.stack([frames[i][..., 0] for i in (2, 2, 3, 3)]))


def test_broken_files_are_skipped_with_a_reason(tmp_path, caplog):
    root = tmp_path / "v"
    _video(root / "good.mkv", 8)
    _video(root / "other.mkv", 8)
    (root / "text.mp4").write_bytes(b"not a video at all" * 50)
    (root / "empty.webm").write_bytes(b"")
    whole = _video(root / "cut.mp4", 30, codec="mpeg4", pix_fmt="yuv420p") and (root / "cut.mp4").read_bytes()
    (root / "cut.mp4").write_bytes(whole[: len(whole) // 3])  # the index (moov) is lost with the end
    _frames_dir(root / "frames", 3)
    Image.fromarray(_frame(0)).save(root / "frames" / "00001.png")
    (root / "frames" / "00001.png").write_bytes((root / "frames" / "00001.png").read_bytes()[:60])
    with caplog.at_level("WARNING", logger="selfsup"):
        clips, _ = _load(root, tmp_path)
    assert len(clips) == 4 and clips.skipped == 4 and "skipped 4 unreadable" in caplog.text
    skipped = Manifest.read(next((tmp_path / "cache").glob("v-*/manifest.json")).parent).skipped()
    assert skipped["empty.webm"] == "empty file: zero bytes"
    assert skipped["text.mp4"].startswith("not a video: ") and skipped["cut.mp4"].startswith("not a video: ")
    assert skipped["frames"].startswith("truncated: frame 00001.png")


def test_short_videos_are_padded_or_skipped(tmp_path):
    frames = _video(tmp_path / "v" / "short.mkv", 3)
    _video(tmp_path / "v" / "long.mkv", 8)
    clips, meta = _load(tmp_path / "v", tmp_path)
    assert meta["valid"].tolist() == [4, 4, 3] and len(clips) == 3
    assert np.array_equal(_frames_of(clips.batch([2])[0]), np.stack(frames + frames[-1:]))  # the last one repeated
    clips, meta = _load(tmp_path / "v", tmp_path, short="skip")
    assert len(clips) == 2 and clips.skipped == 1
    manifests = [Manifest.read(p.parent) for p in (tmp_path / "cache").glob("v-*/manifest.json")]
    skipped = [m for m in manifests if m.settings["short"] == "skip"]
    assert skipped[0].skipped() == {"short.mkv": "too short: 3 frame(s) at 30 fps, fewer than the 4 a record holds"}


def test_a_changed_folder_updates_incrementally(tmp_path):
    root = tmp_path / "v"
    for name in ("a", "b", "c"):
        _video(root / "k" / f"{name}.mkv", 8)
    opts, source = CacheOptions(24, cache_dir=str(tmp_path / "cache"), progress=False), video_source(4, 30)
    first = prepare_folder(root, opts, source)
    assert first.action == "built" and first.decoded == 3 and first.manifest.count == 6
    for d in (root, root / "k"):
        os.utime(d, ns=(PAST_NS, PAST_NS))
    assert prepare_folder(root, opts, source).action == "reused"
    new = _video(root / "k" / "d.mkv", 12)
    (root / "k" / "a.mkv").unlink()
    again = prepare_folder(root, opts, source)
    assert again.action == "updated (1 added, 1 removed)" and (again.decoded, again.reused) == (1, 2)
    clips, meta = _load(root, tmp_path)
    assert [Path(p).name for p in meta["paths"]] == ["b.mkv", "c.mkv", "d.mkv"] and len(clips) == 7
    assert meta["video"].tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert np.array_equal(_frames_of(clips.batch([6])[0]), np.stack(new[8:12]))
    assert np.array_equal(_frames_of(clips.batch([1])[0]), np.stack([_frame(i) for i in range(4, 8)]))  # copied


def test_a_process_pool_build_equals_an_in_process_one(tmp_path):
    for k in range(3):
        _video(tmp_path / "v" / f"{k}.mkv", 8 + 4 * k)
    (tmp_path / "v" / "bad.avi").write_bytes(b"nope" * 10)
    pooled, pm = load_video_folder(tmp_path / "v", 24, frames_per_record=4, fps=30, workers=2, progress=False,
                                   cache_dir=str(tmp_path / "a"))
    serial, sm = load_video_folder(tmp_path / "v", 24, frames_per_record=4, fps=30, workers=1, progress=False,
                                   cache_dir=str(tmp_path / "b"))
    assert len(pooled) == 9 and pooled.skipped == serial.skipped == 1
    assert torch.equal(pooled.images, serial.images) and torch.equal(pm["start"], sm["start"])


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="video folder not found"):
        _load(tmp_path / "missing", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no videos"):
        _load(tmp_path / "empty", tmp_path)
    with pytest.raises(DataError, match="short must be one of pad, skip"):
        _load(tmp_path / "empty", tmp_path, short="loop")
    _video(tmp_path / "v" / "a.mkv", 4)
    monkeypatch.setattr("selfsup.data.video_folder.av_available", lambda: False)
    with pytest.raises(DataError, match=r"pip install 'selfsup\[video\]'"):
        _load(tmp_path / "v", tmp_path)


def test_a_strip_video_is_clamped_to_three_to_one(tmp_path):
    """Frames wider than 3:1 are centre-cropped to 3:1 before squashing, as images are."""
    _video(tmp_path / "v" / "strip.mkv", 4, w=128, h=32)
    clips, _ = _load(tmp_path / "v", tmp_path)
    assert clips.aspect.tolist() == pytest.approx([3.0])
    red = _frames_of(clips.batch([0])[0])[:, 16:, :, 0].astype(float).mean(axis=(1, 2))
    assert np.abs(red - 8 * np.arange(4)).max() < 2
