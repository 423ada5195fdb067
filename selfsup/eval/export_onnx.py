"""``selfsup export --format onnx``: the run's encoder as an ONNX graph, for runtimes without PyTorch.

The encoder as :func:`selfsup.train.rundir.load_run` gives it, in eval mode, on the CPU in float32, exported with
``torch.onnx.export(dynamo=True)`` — the ``torch.export``-based exporter, PyTorch's maintained one (the TorchScript
exporter is deprecated in PyTorch 2.9+ and warns that it will be removed); it needs ``onnxscript``. One input,
``images`` (N, C, H, W), float images in [0, 1] normalised per channel as the JSON sidecar says; one output,
``features`` (N, D). The batch axis is dynamic, the image size the run's (shape-dependent code, such as
small_resnet's GEMM path for 2×2 maps, is fixed for it). When ``onnxruntime`` is installed the file is run on
random batches of two sizes and its largest difference from PyTorch recorded in the sidecar.

Measured (PyTorch 2.14.1, onnxscript 0.7.2, onnxruntime 1.32; 1 CPU thread): small_resnet exports in ~3 s,
torchvision/timm ResNet-18 in ~2 s; ONNX Runtime matches PyTorch to ~2e-6 (float32 rounding).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from selfsup.config import ConfigError
from selfsup.train.checkpoint import CheckpointError
from selfsup.train.rundir import LoadedRun

log = logging.getLogger("selfsup")
INPUT, OUTPUT = "images", "features"
CHECK_BATCHES = (1, 3)
"""Batch sizes the exported graph is checked at (neither the one it was traced with: the axis is dynamic)."""
TRACE_BATCH = 2
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 2**24
"""Weights above this go to ``FILE.onnx.data`` beside the graph (protobuf's 2 GiB limit); smaller models are one file."""


def require_onnx() -> None:
    """The exporter's packages, or one line naming them and the extra that installs them."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError([f"--format onnx needs the package(s) {', '.join(missing)} (PyTorch's ONNX exporter uses "
                           "them): pip install 'selfsup[onnx]'"])


def export_onnx(run: LoadedRun, out: str | Path, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write the encoder to ``out`` (``.onnx``) and ``meta`` plus the ONNX details to ``out`` + ``.json``."""
    require_onnx()
    out = Path(out)
    encoder = run.encoder.to("cpu").float().eval()
    c, s = run.meta["in_chans"], run.meta["image_size"]
    example = torch.rand(TRACE_BATCH, c, s, s)
    quiet = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(quiet):
            program = torch.onnx.export(encoder, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    except Exception as exc:  # the exporter's errors come from many layers (torch.export, onnxscript)
        raise CheckpointError(f"torch.onnx.export could not export backbone {run.cfg.backbone.name!r}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    opset = int(program.model.opset_imports.get("", 0))
    size = sum(p.numel() * p.element_size() for p in encoder.state_dict().values())
    external = size > EXTERNAL_DATA_BYTES
    meta = {**meta, "file_format": "onnx", "onnx": {
        "opset": opset, "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "input": {"name": INPUT, "shape": ["N", c, s, s], "dtype": "float32"},
        "output": {"name": OUTPUT, "shape": ["N", run.meta.get("num_features")], "dtype": "float32"},
        "dynamic_axes": {INPUT: [0], OUTPUT: [0]},
        "external_data": f"{out.name}.data" if external else None}}
    program.model.metadata_props["selfsup"] = json.dumps(meta)  # the normalisation travels with the graph too
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        program.save(str(out), external_data=external)
    except OSError as exc:
        raise CheckpointError(f"could not write {out}: {exc}") from None
    meta["onnx"]["check"] = _check(encoder, out, c, s)
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(meta, indent=2))
    return out, sidecar


def _check(encoder: torch.nn.Module, path: Path, c: int, s: int) -> dict[str, Any]:
    """ONNX Runtime's outputs against PyTorch's on random batches, or why it was not run."""
    if importlib.util.find_spec("onnxruntime") is None:
        return {"skipped": "onnxruntime is not installed (pip install 'selfsup[onnx]')"}
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for batch in CHECK_BATCHES:
        x = torch.rand(batch, c, s, s)
        with torch.no_grad():
            expected = encoder(x).numpy()
        got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
        diff = max(diff, float(abs(got - expected).max()))
    if diff > 1e-3:
        log.warning("ONNX Runtime's features differ from PyTorch's by up to %.2g on random inputs", diff)
    return {"onnxruntime": onnxruntime.__version__, "batch_sizes": list(CHECK_BATCHES), "max_abs_diff": diff}
