"""Video decoding throughput of the candidate decoders, one thread each: which one the video cache uses.

Makes ``--videos`` clips (``--seconds`` s at 30 fps, 160×120, a moving square on a gradient) per codec with PyAV
in a temporary directory, then decodes every clip to RGB uint8 frames with each decoder that imports, ``--repeats``
times with the decoders interleaved, and prints frames/s (median over repeats) as a Markdown table.

    python benchmarks/data/video_decoding.py [--videos 64] [--seconds 3] [--repeats 3]

Candidates: PyAV (``av``: FFmpeg bindings, wheels bundle FFmpeg), torchcodec (PyTorch's decoder; it loads a system
FFmpeg 4-9 at import), torchvision.io (its video reader was removed: reported, not timed). The "resize" columns add
the cache's per-frame work (squash to 85 px, the records of a 64 px image size) with PIL's bicubic resize (as the
image cache) or FFmpeg's swscale (``VideoFrame.reformat``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

CODECS = (("mpeg4", "mp4", "mpeg4"), ("h264", "mp4", "libx264"), ("vp9", "webm", "libvpx-vp9"))


def make_clip(path: Path, codec: str, frames: int, rng: np.random.Generator) -> None:
    import av

    yy, xx = np.mgrid[0:120, 0:160]
    background = np.stack([xx * 255 // 159, yy * 255 // 119, np.full_like(xx, 96)], -1).astype(np.uint8)
    x0, y0, dx, dy = rng.integers(0, 100), rng.integers(0, 70), rng.integers(-3, 4), rng.integers(-3, 4)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=30)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for t in range(frames):
            img = background.copy()
            x, y = (x0 + dx * t) % 130, (y0 + dy * t) % 90
            img[y : y + 30, x : x + 30] = (255, 255 - 4 * t % 256, 0)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def pyav_frames(path: str, resize: int | None = None, swscale: bool = False) -> int:
    import av
    from PIL import Image

    n = 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.thread_count = "SLICE", 1
        for frame in container.decode(stream):
            if resize and swscale:  # threads=1: swscale's own pool would otherwise use every core
                frame.reformat(resize, resize, "rgb24", interpolation="BICUBIC", threads=1).to_ndarray()
            elif resize:
                rgb = Image.fromarray(frame.reformat(format="rgb24", threads=1).to_ndarray())
                np.asarray(rgb.resize((resize, resize), Image.BICUBIC, reducing_gap=3.0))
            else:
                frame.reformat(format="rgb24", threads=1).to_ndarray()
            n += 1
    return n


def torchcodec_frames(path: str) -> int:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(path, num_ffmpeg_threads=1, seek_mode="approximate")
    return len(decoder.get_frames_in_range(0, len(decoder)).data)


def candidates() -> tuple[dict, dict]:
    works = {"PyAV": pyav_frames, "PyAV + PIL resize to 85 px": lambda p: pyav_frames(p, 85),
             "PyAV + swscale resize to 85 px": lambda p: pyav_frames(p, 85, swscale=True)}
    why_not: dict[str, str] = {}
    try:
        import torchcodec.decoders  # noqa: F401  (the FFmpeg libraries load here, or fail)

        from torchcodec.decoders import VideoDecoder  # noqa: F401
        works["torchcodec"] = torchcodec_frames
    except Exception as exc:  # a missing system FFmpeg raises RuntimeError with a long message
        why_not["torchcodec"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    import torchvision.io

    if not hasattr(torchvision.io, "read_video"):
        why_not["torchvision.io"] = f"torchvision {torchvision.__version__} has no video reader (read_video removed)"
    return works, why_not


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import av
    import torch

    torch.set_num_threads(1)
    works, why_not = candidates()
    frames = round(30 * args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        rng, clips = np.random.default_rng(0), {}
        for name, suffix, encoder in CODECS:
            try:
                av.codec.Codec(encoder, "w")
            except Exception:
                print(f"no {encoder} encoder in this PyAV: {name} not measured", file=sys.stderr)
                continue
            clips[name] = [Path(tmp) / f"{name}-{i:03d}.{suffix}" for i in range(args.videos)]
            for p in clips[name]:
                make_clip(p, encoder, frames, rng)
        rates: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for codec, paths in clips.items():
                for decoder, fn in works.items():  # interleaved: the machine's load moves both alike
                    t0 = time.perf_counter()
                    n = sum(fn(str(p)) for p in paths)
                    rates.setdefault((codec, decoder), []).append(n / (time.perf_counter() - t0))
                    assert n == frames * len(paths), (codec, decoder, n)
    print(f"PyAV {av.__version__} (FFmpeg {av.ffmpeg_version_info}), torch {torch.__version__}; "
          f"{args.videos} clips × {frames} frames, 160×120, per codec; median of {args.repeats}, frames/s, one thread\n")
    names = list(works)
    print("| codec | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for codec in clips:
        cells = [f"{statistics.median(rates[(codec, d)]):,.0f}" for d in names]
        print(f"| {codec} | " + " | ".join(cells) + " |")
    for name, reason in why_not.items():
        print(f"\nnot measured: {name}: {reason}")


if __name__ == "__main__":
    main()
