"""A folder of real encoded videos end to end: mp4, webm and mkv written by PyAV at mixed frame rates and sizes,
a folder of PNG frames, a corrupt and a zero-length file; ``pretrain`` on it (read as clips because it holds
videos), ``evaluate``, ``embed`` (one row per clip, with its start time), ``neighbors`` of a video, ``report``;
and an image encoder pointed at it gets one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import selfsup
from selfsup.cli import main
from selfsup.config import load_config
from selfsup.data import load_dataset

av = pytest.importorskip("av")
pytestmark = pytest.mark.usefixtures("one_thread")

# (file name, container codec, frame rate, width, height): mixed rates and sizes, lossy and lossless codecs
VIDEOS = [("a.mp4", "mpeg4", 25, 64, 48), ("b.webm", "libvpx", 12, 40, 56), ("c.mkv", "ffv1", 30, 48, 48),
          ("d.mp4", "mpeg4", 15, 56, 40), ("e.webm", "libvpx", 24, 48, 64), ("f.mkv", "ffv1", 10, 32, 32)]
SECONDS = 2.0


def _frames(n: int, w: int, h: int, direction: int, phase: int) -> list[np.ndarray]:
    """A bright square crossing a textured background, left to right (direction 1) or back (-1)."""
    rng = np.random.default_rng(phase)
    background = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
    side = max(6, min(w, h) // 4)
    out = []
    for i in range(n):
        a = background.copy()
        x = int((phase * 7 + direction * i * (w - side) / max(n - 1, 1)) % (w - side))
        a[h // 2 - side // 2 : h // 2 + side // 2, x : x + side] = (230, 200, 40)
        out.append(a)
    return out


def _write_video(path: Path, codec: str, rate: int, w: int, h: int, direction: int, phase: int) -> None:
    pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for a in _frames(int(rate * SECONDS), w, h, direction, phase):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(stream.encode())


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos") / "clips"
    for label, direction in (("left", -1), ("right", 1)):
        folder = root / label
        folder.mkdir(parents=True)
        for phase, (name, codec, rate, w, h) in enumerate(VIDEOS):
            _write_video(folder / name, codec, rate, w, h, direction, phase)
        frames = folder / "frames_png"  # a clip given as frame images (read at data.video.fps)
        frames.mkdir()
        for i, a in enumerate(_frames(16, 40, 40, direction, 9)):
            Image.fromarray(a).save(frames / f"{i:04d}.png")
    (root / "left" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    (root / "right" / "empty.webm").write_bytes(b"")
    return root


def _settings(folder: Path, cache: Path, **more) -> dict:
    return {"data.name": str(folder), "data.cache_dir": str(cache), "data.image_size": 32, "data.val_size": 4,
            "data.video": {"frames": 8, "fps": 8}, "method.name": "arrow_of_time", "views.clip_len": 4,
            "views.stride": 2, "train.epochs": 2, "train.batch_size": 8, "train.progress": False,
            "train.knn_every": 1, "backbone.params": {"widths": [8, 16, 32]}, **more}


@pytest.fixture(scope="module")
def folder_run(video_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    run = tmp_path_factory.mktemp("runs") / "arrow"
    summary = selfsup.pretrain(load_config(None, _settings(video_folder, cache)), run)
    return run, summary, cache


def test_the_folder_is_read_as_clips_split_by_video(video_folder, tmp_path):
    cfg = load_config(None, _settings(video_folder, tmp_path / "cache")).data
    train, test = load_dataset(cfg)
    assert train.kind == "clips" and train.frames == 8 and train.classes == ["left", "right"]
    assert train.skipped == 2  # the corrupt and the empty file, listed in the cache's manifest
    assert not set(train.paths) & set(test.paths) and len(test)  # no video on both sides
    # 2 s at 8 fps = 16 frames = two records of 8 for each of the 14 clips (12 videos, 2 frame folders)
    assert len(train) + len(test) == 28 and set(train.start.tolist()) == {0.0, 1.0}


def test_pretrain_evaluate_embed_neighbors_and_report(folder_run, video_folder, tmp_path):
    run, summary, _ = folder_run
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["inputs"] == "clips" and meta["clip"]["record_frames"] == 8 and meta["in_chans"] == 3
    assert summary["step"] > 0 and (run / "encoder.pt").is_file()

    (knn,) = selfsup.evaluate_run(run, ["knn"])
    assert 0 <= knn["accuracy"] <= 1 and {"random_encoder", "single_frame", "shuffled_frames"} <= set(knn["baselines"])

    out = tmp_path / "emb.npz"
    assert main(["embed", str(run), "--data", str(video_folder), "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as z:
        assert z["embeddings"].shape[0] == 28 == len(z["paths"]) == len(z["starts"])
        assert sorted(set(z["starts"].tolist())) == [0.0, 1.0]
        assert {Path(p).name for p in z["paths"]} == {name for name, *_ in VIDEOS} | {"frames_png"}


def test_neighbors_of_a_video_are_clips_of_other_videos(folder_run, video_folder, capsys):
    run, _, _ = folder_run
    query = video_folder / "left" / "a.mp4"
    assert main(["neighbors", str(run), "--data", str(video_folder), "--query", str(query), "--k", "3",
                 "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert len(found["neighbors"]) == 3 and found["skipped"] == 2
    assert all(Path(n["path"]) != query and n["start_s"] in (0.0, 1.0) for n in found["neighbors"])
    assert main(["neighbors", str(run), "--data", str(video_folder), "--duplicates", "--json"]) == 0


def test_the_report_of_a_folder_run(folder_run):
    from selfsup.report.html import write_report

    run, _, _ = folder_run
    assert Path(write_report(run)).is_file()


def test_an_image_encoder_is_not_given_videos(video_folder, tmp_path, capsys):
    run = tmp_path / "still"
    selfsup.pretrain(load_config(None, {"method.name": "simclr", "data.name": "digits", "data.limit": 64,
                                        "train.epochs": 1, "train.batch_size": 16, "train.progress": False,
                                        "backbone.params": {"widths": [8, 16]}}), run)
    assert main(["embed", str(run), "--data", str(video_folder), "--out", str(tmp_path / "e.npz")]) == 2
    assert "holds videos and this encoder was trained on still images" in capsys.readouterr().err


def test_frame_folders_alone_are_videos_when_data_kind_says_so(tmp_path):
    """A folder of frame folders is laid out as an image folder with class sub-folders: ``auto`` reads images,
    ``data.kind=videos`` reads one clip per frame folder."""
    root = tmp_path / "frames"
    for name, direction in (("one", 1), ("two", -1)):
        (root / name).mkdir(parents=True)
        for i, a in enumerate(_frames(8, 32, 32, direction, 0)):
            Image.fromarray(a).save(root / name / f"{i:03d}.png")
    base = {"data.name": str(root), "data.cache_dir": str(tmp_path / "cache"), "data.image_size": 24,
            "data.video": {"frames": 4}}
    as_images, held_out = load_dataset(load_config(None, base).data)  # labelled by folder: split 80/20
    as_clips, _ = load_dataset(load_config(None, {**base, "data.kind": "videos"}).data)
    assert as_images.kind == "images" and len(as_images) + len(held_out) == 16
    assert as_clips.kind == "clips" and len(as_clips) == 4 and as_clips.frames == 4 and as_clips.labels is None


def test_bad_video_settings_are_one_line_each():
    from selfsup.config import ConfigError

    with pytest.raises(ConfigError, match="data.kind must be auto, images or videos"):
        load_config(None, {"data.kind": "films"})
    with pytest.raises(ConfigError, match="data.video has no setting 'rate'"):
        load_config(None, {"data.video": {"rate": 8}})


def test_prepare_builds_the_cache_pretraining_reads(video_folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["prepare", str(video_folder), "--image-size", "32", "--cache-dir", str(cache), "--frames", "8",
            "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("built: ") and "28 clip records of 8 frames at 8 fps from 14 videos" in out
    assert "skipped 2" in out
    cfg = load_config(None, _settings(video_folder, cache)).data
    assert main(args) == 0 and capsys.readouterr().out.startswith("reused: ")
    train, test = load_dataset(cfg)  # the same cache, not a second one
    assert len(train) + len(test) == 28 and len([p for p in cache.iterdir() if p.is_dir()]) == 1
