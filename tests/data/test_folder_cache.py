"""Image folders through the on-disk cache: unusual and broken files, large images, a folder that changes,
damaged caches, a full disk and a killed build."""
from __future__ import annotations

import errno
import io
from collections import namedtuple
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.cli import main
from selfsup.data import DataError
from selfsup.data import build as build_mod
from selfsup.data import cache as cache_mod
from selfsup.data import decode as decode_mod
from selfsup.data.cache import CacheOptions, cache_path, load_image_folder, prepare_folder
from selfsup.data.decode import MAX_ASPECT, decode_image
from selfsup.data.manifest import MANIFEST, SHARD

ROOT = Path(__file__).resolve().parents[2]
shutil_usage = namedtuple("usage", "total used free")


def _noise(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A crop of one of scikit-learn's sample photos, resized: real image content."""
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().images[seed % 2]
    top, left = (seed * 37) % 100, (seed * 53) % 200
    return Image.fromarray(photo[top : top + 300, left : left + 400]).resize((width, height), Image.BICUBIC)


def _flat(folder: Path, n: int, size=(40, 30), fmt: str = "png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i:03d}.{fmt}"
        _photo(*size, seed=i).save(p)
        paths.append(p)
    return paths


PAST_NS = 1_577_836_800 * 10**9  # 2020-01-01


def _backdate(folder: Path, ns: int = PAST_NS) -> None:
    """Directory times set to a fixed moment in the past, so the fast check trusts them (a directory changed
    in the last 2 s is always listed again: see selfsup.data.folder.RACY_NS)."""
    for d in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        os.utime(d, ns=(ns, ns))


def _opts(tmp_path: Path, size: int = 16, **kw) -> CacheOptions:
    return CacheOptions(size, cache_dir=str(tmp_path / "cache"), progress=False, **kw)


def _load(folder: Path, tmp_path: Path, size: int = 16, **kw):
    return load_image_folder(folder, size, cache_dir=str(tmp_path / "cache"), progress=False, **kw)


def _leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").glob(".*"))


# ------------------------------------------------------------------------------------ decoding anything


def test_mixed_modes_sizes_and_nesting(tmp_path):
    """Palette (with transparency), 16-bit, CMYK, RGBA, LA, bilevel and float images, 1 px to 3000 px, in
    nested class subfolders: all cached as 8-bit RGB records, whole, with their aspect ratios."""
    root = tmp_path / "f"
    (root / "a").mkdir(parents=True)
    (root / "b" / "sub" / "deeper").mkdir(parents=True)
    base = _noise(12, 10)
    p = base.convert("P")
    p.info["transparency"] = 0
    p.save(root / "a" / "palette_transparent.png", transparency=0)
    base.convert("RGBA").save(root / "a" / "rgba.png")
    base.convert("CMYK").save(root / "a" / "cmyk.jpg")
    base.convert("LA").save(root / "a" / "la.png")
    Image.fromarray((np.arange(120, dtype=np.uint16).reshape(10, 12) * 500)).save(root / "b" / "sixteen.png")
    base.convert("1").save(root / "b" / "bilevel.png")
    Image.fromarray(np.full((10, 12), 3.5, dtype=np.float32)).save(root / "b" / "sub" / "float.tiff")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(root / "b" / "sub" / "tiny.png")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(root / "b" / "sub" / "deeper" / "twenty.png")
    Image.new("RGB", (3000, 2), (0, 0, 255)).save(root / "b" / "wide.png")
    Image.new("RGBA", (30, 60), (0, 0, 0, 0)).save(root / "b" / "transparent_tall.png")
    _photo(3000, 2000).save(root / "b" / "sub" / "photo3000.jpg", quality=90)
    images = _load(root, tmp_path)
    s = round(16 * 4 / 3)
    assert images.classes == ["a", "b"] and len(images) == 12 and images.skipped == 0
    assert images.mapped and images.channels == 3 and images.stored_size == s and images.image_size == 16
    assert images.images.shape == (12, 3, s, s) and images.labels.tolist() == [0] * 4 + [1] * 8
    at = lambda name: images.paths.index(str(root / name))
    tiny = images.batch([at("b/sub/tiny.png")])[0]
    assert tiny[0].min() == 255 and tiny[1].max() == 0
    assert images.batch([at("b/sixteen.png")])[0].max() > 200, "16-bit images are rescaled, not clipped"
    assert images.batch([at("b/transparent_tall.png")]).min() == 255, "transparency is composited on white"
    aspect = dict(zip(images.paths, images.aspect.tolist()))
    assert aspect[str(root / "b/wide.png")] == pytest.approx(MAX_ASPECT)  # 1500:1 centre-cropped to 3:1
    assert aspect[str(root / "b/sub/photo3000.jpg")] == pytest.approx(1.5)
    assert aspect[str(root / "b/transparent_tall.png")] == pytest.approx(0.5)
    assert aspect[str(root / "a/cmyk.jpg")] == pytest.approx(1.2)


def test_more_photo_formats_are_listed_and_decoded(tmp_path):
    """.jfif (a browser's JPEG), .jpe, .mpo (a camera's multi-picture JPEG), .dib, .tga, .pnm, .apng, and .avif and
    .jp2 where this PIL was built with them, each decoded like the same picture saved as PNG."""
    from PIL import features

    root = tmp_path / "f"
    root.mkdir()
    photo = _photo(90, 60)
    photo.save(root / "reference.png")
    saves = {"browser.jfif": "JPEG", "short.jpe": "JPEG", "camera.mpo": "MPO", "bitmap.dib": "BMP", "targa.tga": "TGA",
             "any.pnm": "PPM", "animated.apng": "PNG"}
    if features.check("avif"):
        saves["modern.avif"] = "AVIF"
    if features.check("jpg_2000"):
        saves["satellite.jp2"] = "JPEG2000"
    for name, fmt in saves.items():
        photo.save(root / name, format=fmt, **({"quality": 95} if fmt in ("JPEG", "MPO", "AVIF") else {}))
    images = _load(root, tmp_path, size=32)
    assert images.skipped == 0 and len(images) == len(saves) + 1
    at = lambda name: images.paths.index(str(root / name))
    reference = images.batch([at("reference.png")])[0].float()
    for name in saves:
        record = images.batch([at(name)])[0].float()
        assert (record - reference).abs().mean() < 0.03 * 255, name  # lossy codecs differ a little (3% of the range)


@pytest.mark.parametrize("full_scale", [65535, 4000])
def test_large_sixteen_bit_image_is_reduced_and_rescaled(tmp_path, full_scale):
    """A 16-bit greyscale PNG many times the record's size goes through PIL's box reduce, which has no 16-bit
    kernel ("image has wrong mode" until the image was widened to 32-bit first); its values keep the 16-bit
    scale, so a dark one (max 4,000 of 65,535) stays dark, and the record matches the same picture saved in 8 bits."""
    ramp = np.linspace(0, 1, 640, dtype=np.float64)[None, :].repeat(480, 0)
    Image.fromarray(np.round(ramp * full_scale).astype(np.uint16)).save(tmp_path / "sixteen.png")
    Image.fromarray(np.round(ramp * full_scale / 65535 * 255).astype(np.uint8)).save(tmp_path / "eight.png")
    sixteen, eight = decode_image(tmp_path / "sixteen.png", 43), decode_image(tmp_path / "eight.png", 43)
    assert sixteen.gray and sixteen.pixels.shape == (43, 43, 1) and (sixteen.width, sixteen.height) == (640, 480)
    assert np.abs(sixteen.pixels.astype(int) - eight.pixels.astype(int)).max() <= 1
    top = full_scale / 65535 * 255  # the ramp's brightest column, in 8 bits (the record's last pixel averages a few)
    assert 0.95 * top <= sixteen.pixels.max() <= top + 1


def test_files_an_older_decoder_could_not_read_are_retried_once(tmp_path, monkeypatch, caplog):
    """A cache built by an older decoder (DECODER_VERSION 1) that skipped a file with a decode error is updated on
    its next use: that file alone is decoded again; empty or unidentifiable files stay skipped and are not retried."""
    root = tmp_path / "f"
    root.mkdir()
    for k in range(3):  # a folder mostly readable (more than half unreadable is refused)
        _noise(40, 30, seed=k).save(root / f"rgb{k}.png")
    Image.fromarray((np.arange(640 * 480) % 65536).astype(np.uint16).reshape(480, 640)).save(root / "sixteen.png")
    (root / "empty.png").write_bytes(b"")
    real = build_mod._attempt
    monkeypatch.setattr(build_mod, "DECODER_VERSION", 1)
    monkeypatch.setattr(build_mod, "_attempt", lambda path, size: "decode error: ValueError: image has wrong mode"
                        if path.endswith("sixteen.png") else real(path, size))
    assert len(_load(root, tmp_path, workers=1)) == 3
    monkeypatch.undo()
    with caplog.at_level("WARNING", logger="selfsup"):
        images = _load(root, tmp_path, workers=1)
    assert len(images) == 4 and images.skipped == 1
    assert "1 unreadable before, retried" in caplog.text
    manifest = json.loads(next((tmp_path / "cache").glob("f-*/manifest.json")).read_text())
    assert manifest["build"]["decoded"] == 1 and manifest["build"]["reused"] == 4
    assert manifest["build"]["decoder"] == decode_mod.DECODER_VERSION
    caplog.clear()
    with caplog.at_level("WARNING", logger="selfsup"):
        assert len(_load(root, tmp_path, workers=1)) == 4
    assert "updating" not in caplog.text  # the empty file is not retried: the cache is used as it is


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored landscape with orientation 6 (turn 90° clockwise to view) is cached upright, with
    the upright picture's aspect ratio."""
    photo = _photo(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "turned.jpg", quality=95, exif=exif)
    photo.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.jpg", quality=95)
    turned, upright = decode_image(tmp_path / "turned.jpg", 32), decode_image(tmp_path / "upright.jpg", 32)
    assert turned.aspect == pytest.approx(80 / 120) and (turned.width, turned.height) == (80, 120)
    assert np.abs(turned.pixels.astype(float) - upright.pixels).mean() < 3


def test_unlabelled_and_grayscale_folders(tmp_path):
    for i in range(3):
        _noise(10, 8, seed=i, mode="L").save(tmp_path / f"{i}.png")
    (tmp_path / "sub").mkdir()
    _noise(10, 8, seed=5, mode="1").save(tmp_path / "sub" / "bilevel.png")
    images = _load(tmp_path, tmp_path / "out")
    assert images.channels == 1 and images.labels is None and len(images) == 4  # top-level files: unlabelled
    m = json.loads((Path(images.source) / MANIFEST).read_text())
    assert m["channels"] == 1 and os.path.getsize(Path(images.source) / SHARD) == 4 * 21 * 21


def test_broken_files_are_skipped_counted_and_recorded(tmp_path):
    folder = tmp_path / "f"
    _flat(folder, 6)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image")
    jpeg = io.BytesIO()
    _photo(64, 48).save(jpeg, format="JPEG")
    (folder / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    os.symlink(folder / "missing.png", folder / "dangling.png")
    images = _load(folder, tmp_path)
    assert len(images) == 6 and images.skipped == 4
    m = json.loads((Path(images.source) / MANIFEST).read_text())
    reasons = {p: r for p, r in zip(m["files"]["path"], m["files"]["skip"]) if r} | m["problems"]
    assert reasons["zero.png"].startswith("empty file") and reasons["text.png"].startswith("not an image")
    assert reasons["cut.jpg"].startswith("truncated") and reasons["dangling.png"].startswith("broken link")


def test_mostly_broken_folder_stops_with_a_summary(tmp_path):
    _flat(tmp_path / "f", 1)
    for i in range(3):
        (tmp_path / "f" / f"bad{i}.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="3 of 4 image files are unreadable"):
        _load(tmp_path / "f", tmp_path)


def test_images_over_pils_bomb_limit_are_decoded_reduced_not_skipped(tmp_path, monkeypatch):
    """PIL's limit lowered to 1,000 pixels: a 200×150 PNG and a 400×300 JPEG are over it and still load,
    the JPEG through reduced (1/8-scale) decoding; the limit is back to normal afterwards; a file over
    our own cap is skipped with the reason."""
    folder = tmp_path / "f"
    folder.mkdir()
    _photo(200, 150).save(folder / "big.png")
    _photo(400, 300).save(folder / "big.jpg", quality=95)
    _photo(20, 15).save(folder / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    images = _load(folder, tmp_path)
    assert len(images) == 3 and images.skipped == 0 and Image.MAX_IMAGE_PIXELS == 1000
    monkeypatch.setattr(decode_mod, "PIXEL_CAP", 10_000)
    with pytest.raises(decode_mod.Unreadable, match="too large: 200×150 = 30,000 pixels is over the 10,000"):
        decode_image(folder / "big.png", 21)


def test_large_jpeg_reduced_decoding_matches_a_full_decode(tmp_path):
    """A 3000×2000 photo decoded at 1/8 scale (``draft``) and reduced, against a full decode resized with
    plain bicubic: the same picture (mean difference under 2 grey levels)."""
    path = tmp_path / "photo.jpg"
    _photo(3000, 2000).save(path, quality=92)
    fast = decode_image(path, 85).pixels.astype(np.float32)
    with Image.open(path) as img:
        full = np.asarray(img.convert("RGB").resize((85, 85), Image.BICUBIC), dtype=np.float32)
    assert fast.shape == full.shape == (85, 85, 3) and np.abs(fast - full).mean() < 2.0


def test_symlink_loop_ends_and_each_directory_is_read_once(tmp_path):
    folder = tmp_path / "f"
    _flat(folder / "cats", 3)
    os.symlink(folder, folder / "cats" / "loop")
    os.symlink(folder / "cats", folder / "again")
    images = _load(folder, tmp_path)
    assert len(images) == 3


def test_unreadable_file_is_skipped_and_recorded(tmp_path):
    folder = tmp_path / "f"
    paths = _flat(folder, 4)
    paths[0].chmod(0)
    try:
        images = _load(folder, tmp_path)
    finally:
        paths[0].chmod(0o644)
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop reads")
    assert len(images) == 3 and images.skipped == 1
    m = json.loads((Path(images.source) / MANIFEST).read_text())
    assert m["files"]["skip"][0].startswith("permission denied")


# --------------------------------------------------------------------------------------- a changing folder


def test_folder_changes_are_detected_and_only_new_files_decoded(tmp_path):
    folder = tmp_path / "f"
    paths = _flat(folder / "a", 5) + _flat(folder / "b", 5)
    _backdate(folder)
    first = prepare_folder(folder, _opts(tmp_path))
    assert first.action == "built" and first.decoded == 10
    assert prepare_folder(folder, _opts(tmp_path)).action == "reused"

    _photo(40, 30, seed=99).save(folder / "b" / "new.png")  # added: the fast check sees b's new mtime
    added = prepare_folder(folder, _opts(tmp_path))
    assert added.action == "updated (1 added)" and (added.decoded, added.reused) == (1, 10)
    _backdate(folder)

    paths[0].unlink()
    removed = prepare_folder(folder, _opts(tmp_path))
    assert removed.action == "updated (1 removed)" and removed.decoded == 0 and removed.manifest.count == 10
    _backdate(folder)
    # the update listed directories changed a moment before, whose times it could not trust yet; this
    # check lists them again, finds no change and records their times
    assert prepare_folder(folder, _opts(tmp_path)).action == "reused"

    before = _load(folder, tmp_path).batch([3])
    _photo(40, 30, seed=50).save(paths[4])  # rewritten in place: the directory's mtime does not change
    assert prepare_folder(folder, _opts(tmp_path)).action == "reused"  # the fast check cannot see it ...
    full = prepare_folder(folder, _opts(tmp_path, check="full"))  # ... the full one does
    assert full.action == "updated (1 modified)" and full.decoded == 1
    assert not torch.equal(_load(folder, tmp_path).batch([3]), before)

    (folder / "a" / "notes.txt").write_text("not an image")  # a directory changed, no image did
    _backdate(folder, PAST_NS + 10**9)
    assert prepare_folder(folder, _opts(tmp_path)).action == "reused"
    m = json.loads((cache_path(folder, _opts(tmp_path)) / MANIFEST).read_text())
    assert m["dirs"]["a"] == PAST_NS + 10**9  # refreshed: the next fast check lists nothing
    assert _leftovers(tmp_path) == []


def test_a_file_deleted_after_the_build_is_still_read_from_the_cache(tmp_path):
    folder = tmp_path / "f"
    paths = _flat(folder, 4)
    images = _load(folder, tmp_path)
    everything = images.batch(torch.arange(4))
    paths[1].unlink()
    assert torch.equal(images.batch(torch.arange(4)), everything)  # the records do not need the files
    again = prepare_folder(folder, _opts(tmp_path))
    assert again.action == "updated (1 removed)" and again.manifest.count == 3


def test_another_image_size_gets_its_own_cache(tmp_path):
    folder = tmp_path / "f"
    _flat(folder, 3)
    small, large = _load(folder, tmp_path, 16), _load(folder, tmp_path, 24)
    assert (small.stored_size, large.stored_size) == (21, 32) and small.source != large.source
    assert prepare_folder(folder, _opts(tmp_path, 16)).action == "reused"
    assert prepare_folder(folder, _opts(tmp_path, 16, cache_size=40)).action == "built"
    with pytest.raises(DataError, match="smaller than the image size"):
        prepare_folder(folder, _opts(tmp_path, 16, cache_size=12))


def test_a_cache_with_other_settings_or_a_truncated_shard_is_rebuilt_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "f"
    _flat(folder, 5)
    good = _load(folder, tmp_path).images.clone()
    target = cache_path(folder, _opts(tmp_path))
    m = json.loads((target / MANIFEST).read_text())
    m["settings"]["size"] = 99
    (target / MANIFEST).write_text(json.dumps(m))
    report = prepare_folder(folder, _opts(tmp_path))
    assert report.action.startswith("rebuilt (built with other settings") and "cannot be used" in caplog.text
    with open(target / SHARD, "r+b") as f:
        f.truncate(os.path.getsize(target / SHARD) - 100)
    report = prepare_folder(folder, _opts(tmp_path))
    assert report.action.startswith("rebuilt (the shard images.u8 has") and "truncated" in report.action
    assert torch.equal(_load(folder, tmp_path).images, good)
    (target / MANIFEST).write_text("{not json")
    assert prepare_folder(folder, _opts(tmp_path)).action.startswith("rebuilt (unreadable manifest")


# ---------------------------------------------------------------------------------- interrupted builds


def test_a_full_disk_during_the_build_leaves_no_cache_and_says_so(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    _flat(folder, 6)
    write, calls = build_mod._write_records, []

    def fill_up(f, records):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(f, records)

    monkeypatch.setattr(build_mod, "_write_records", fill_up)
    with pytest.raises(DataError, match="no space left to build the image cache .* free space or point "
                                        "data.cache_dir"):
        _load(folder, tmp_path)
    assert not cache_path(folder, _opts(tmp_path)).exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(build_mod, "_write_records", write)
    # too little room to start with: said before any decoding
    monkeypatch.setattr(build_mod.shutil, "disk_usage", lambda path: shutil_usage(1, 1, 1000))
    with pytest.raises(DataError, match=r"needs up to 0.00 GiB while building, 0.00 GiB free"):
        _load(folder, tmp_path)
    monkeypatch.undo()
    assert len(_load(folder, tmp_path)) == 6 and _leftovers(tmp_path) == []


KILLED_BUILD = """
import sys, time
import selfsup.data.build as build
import selfsup.data.cache as cache
write = build._write_records
def slow(f, records):
    write(f, records)
    f.flush()
    print("record", flush=True)
    time.sleep(0.2)
build._write_records = slow
cache.load_image_folder(sys.argv[1], 16, cache_dir=sys.argv[2], workers=1, progress=False)
print("finished", flush=True)
"""


def test_a_build_killed_midway_is_never_used_and_the_next_build_starts_clean(tmp_path):
    folder = tmp_path / "f"
    _flat(folder, 8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(folder), str(tmp_path / "cache")],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(3):
            assert proc.stdout.readline().strip() == "record"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    target = cache_path(folder, _opts(tmp_path))
    assert not target.exists() and any(n.startswith(".tmp-") for n in _leftovers(tmp_path))
    images = _load(folder, tmp_path)
    assert len(images) == 8 and _leftovers(tmp_path) == []
    assert torch.equal(images.images, _load(folder, tmp_path / "elsewhere").images)


def test_concurrent_builds_of_one_cache_build_it_once(tmp_path, monkeypatch):
    folder = tmp_path / "f"
    _flat(folder, 6)
    builds, reports = [], []
    real = cache_mod.build_cache

    def counting(*args, **kw):
        builds.append(1)
        time.sleep(0.3)  # the other thread arrives while this one holds the lock
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "build_cache", counting)
    threads = [threading.Thread(target=lambda: reports.append(prepare_folder(folder, _opts(tmp_path))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and sorted(r.action for r in reports) == ["built", "reused"]


def test_a_process_pool_build_equals_an_in_process_one(tmp_path):
    folder = tmp_path / "f"
    _flat(folder / "x", build_mod.POOL_MIN_FILES // 2, fmt="jpg")
    _flat(folder / "y", build_mod.POOL_MIN_FILES // 2 + 3, fmt="png")
    (folder / "y" / "bad.png").write_bytes(b"nope")
    pooled = _load(folder, tmp_path / "a", workers=2)
    serial = _load(folder, tmp_path / "b", workers=1)
    assert len(pooled) == build_mod.POOL_MIN_FILES + 3 and pooled.skipped == serial.skipped == 1
    assert torch.equal(pooled.images, serial.images) and torch.equal(pooled.aspect, serial.aspect)
    assert pooled.paths == serial.paths and torch.equal(pooled.labels, serial.labels)


# ---------------------------------------------------------------------------------------- selfsup prepare


def test_prepare_command_builds_reuses_and_verifies(tmp_path, capsys):
    folder = tmp_path / "f"
    paths = _flat(folder / "a", 3) + _flat(folder / "b", 2)
    (folder / "b" / "broken.png").write_text("no")
    _backdate(folder)
    argv = ["prepare", str(folder), "--image-size", "24", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("built: ") and "5 images (labelled, 2 classes), stored as 3×32×32" in out
    assert "skipped 1: not an image ×1" in out
    assert main(argv) == 0 and capsys.readouterr().out.startswith("reused: ")
    _photo(40, 30, seed=77).save(paths[0])
    _backdate(folder)
    assert main(argv + ["--verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("updated (1 modified): ") and "decoded 1 file(s), 5 unchanged" in out
    assert main(["prepare", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "image folder not found" in capsys.readouterr().err


def test_labelled_folder_with_tiny_classes_splits_and_probes(tmp_path):
    """An imbalanced labelled folder (classes of 1, 2 and 60 images): the 80/20 split keeps the tiny classes whole
    on the training side (they used to stop even pretraining with a label-fraction error), and the linear probe,
    which holds 10% of the training features out to choose its L2 strength, fits all three classes."""
    from selfsup.config import DataConfig
    from selfsup.data import load_dataset
    from selfsup.eval.linear import linear_probe

    root = tmp_path / "f"
    for name, n in (("many", 60), ("pair", 2), ("solo", 1)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            _noise(20, 16, seed=len(name) * 100 + i).save(root / name / f"{i}.png")
    train, test = load_dataset(DataConfig(name=str(root), image_size=16, cache_dir=str(tmp_path / "cache")))
    assert train.classes == ["many", "pair", "solo"]
    assert torch.bincount(train.labels, minlength=3).tolist() == [48, 2, 1]
    assert torch.bincount(test.labels, minlength=3).tolist() == [12, 0, 0]
    features = torch.randn(len(train), 8)
    result = linear_probe(features, train.labels, torch.randn(len(test), 8), test.labels, 3)
    assert 0 <= result["accuracy"] <= 1


def test_heic_photos_are_read_upright_or_skipped_with_the_fix(tmp_path, monkeypatch):
    """HEIC (a phone's photos), through pi-heif: decoded like the PNG of the same picture, and one stored turned
    with EXIF orientation 6 comes out upright with the upright aspect (pi-heif applies the turn itself; the decoder
    must not turn it again). Without pi-heif each HEIC file is skipped with a reason naming the package.
    The fixtures in tests/data/heic/ (120×80, one of scikit-learn's sample photos) were written once with
    pillow-heif's encoder: ``reference.png``; ``phone.heic``; ``turned.heic``, the photo turned a quarter
    anticlockwise and saved with orientation 6."""
    pytest.importorskip("pi_heif")
    assert decode_mod.heif_readable()
    root = tmp_path / "f"
    shutil.copytree(Path(__file__).parent / "heic", root)
    reference = decode_image(root / "reference.png", 32)
    for name in ("phone.heic", "turned.heic"):
        heic = decode_image(root / name, 32)
        assert heic.aspect == pytest.approx(1.5), f"{name}: upright, turned once"
        assert np.abs(heic.pixels.astype(int) - reference.pixels).mean() < 8, name
    monkeypatch.setattr(decode_mod, "heif_readable", lambda: False)  # as if pi-heif were not installed
    with pytest.raises(decode_mod.Unreadable, match="pi-heif"):
        decode_image(root / "phone.heic", 32)
    with pytest.raises(DataError, match=r"2 of 3 image files are unreadable .*pip install 'selfsup\[heif\]'"):
        _load(root, tmp_path, size=24, workers=1)  # mostly HEIC: refused, saying what to install
    monkeypatch.undo()  # installed: the same folder, unchanged, now gives all three (the skips are retried)
    images = _load(root, tmp_path, size=24, workers=1)
    assert len(images) == 3 and images.skipped == 0
