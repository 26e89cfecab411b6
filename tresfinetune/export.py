"""Exporting a trained checkpoint to ONNX or TorchScript, fused for inference and checked against PyTorch.

    result = export_model("runs/flowers-20250101-120000", "model.onnx", "onnx")

The exported network is the fused one (norms folded into the convolutions, the anti-alias blur as a fixed conv).
Before the file is kept, its outputs are compared with the unfused PyTorch model on sample inputs: the file is
read back (TorchScript with torch.jit.load, ONNX with onnxruntime when installed) and a relative difference
above 1e-4 is an error. What a user of the file needs to feed and read it goes into the file itself: class names,
input size, mean/std, task and thresholds (ONNX metadata_props, TorchScript extra file `tresfinetune.json`).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tresfinetune.checkpoint import RunInfo
from tresfinetune.datasets.transforms import to_model_input
from tresfinetune.errors import UserError
from tresfinetune.models.from_checkpoint import TrainedModel

log = logging.getLogger("tresfinetune")

FORMATS = ("onnx", "torchscript")
SUFFIX_FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}
TORCHSCRIPT_METADATA_FILE = "tresfinetune.json"
MAX_RELATIVE_DIFFERENCE = 1e-4
ONNX_OPSET = 17
SAMPLE_BATCH = 2  # the file is traced at this batch size and checked at another one (the batch axis is dynamic)


@dataclass
class ExportResult:
    path: Path
    format: str
    metadata: dict
    fused_difference: float  # max |fused - original| over the sample outputs, relative to max |original|
    file_difference: float | None  # the same for the exported file run by its runtime; None if it could not be run
    runtime: str | None  # what ran the exported file: "torch.jit" or "onnxruntime"


def export_metadata(trained: TrainedModel) -> dict:
    """What a program using the exported file needs to know: classes, preprocessing, task, thresholds."""
    info = trained.info
    return {
        "producer": "tresfinetune",
        "model_name": trained.architecture,
        "task": info.task,
        "class_names": list(info.class_names),
        "input_size": int(info.input_size),
        "mean": [float(m) for m in info.mean],
        "std": [float(s) for s in info.std],
        "thresholds": None if info.thresholds is None else [float(t) for t in info.thresholds],
        "input": "float32 (batch, 3, input_size, input_size), RGB, (pixel / 255 - mean) / std",
        "output": "logits; softmax for single-label, sigmoid (>= threshold) for multi-label",
    }


def relative_difference(output: torch.Tensor | np.ndarray, reference: torch.Tensor) -> float:
    output = torch.as_tensor(output, dtype=torch.float32)
    return float((output - reference).abs().max() / reference.abs().max().clamp_min(1e-12))


def sample_inputs(info: RunInfo, batch: int, seed: int = 0) -> torch.Tensor:
    """Random images prepared as training prepared its batches (scaled to [0, 1], normalised)."""
    generator = torch.Generator().manual_seed(seed)
    size = info.input_size
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)
    return to_model_input(images, torch.device("cpu"), info.mean, info.std)


def _check(difference: float, what: str) -> None:
    if not difference <= MAX_RELATIVE_DIFFERENCE:  # also catches NaN
        raise UserError(f"{what} differs from the PyTorch model by {difference:.2e} relative (limit "
                        f"{MAX_RELATIVE_DIFFERENCE:g}); the export is not trustworthy, so nothing was kept")


def _export_torchscript(fused: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices; the format itself is what was asked for
        traced = torch.jit.trace(fused, example)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})


def _run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(images)


def _require_onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the onnx package: pip install 'tresfinetune[onnx]' (or export with "
                        "--format torchscript)") from None
    return onnx


def _export_onnx(fused: nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> None:
    onnx = _require_onnx()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs onnxscript; this one
        # needs only torch and onnx and handles every layer of the fused model.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fused, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    graph = onnx.load(str(path))
    for key, value in metadata.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    graph.producer_name = "tresfinetune"
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


def _run_onnx(path: Path, images: torch.Tensor) -> np.ndarray | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images.numpy()})[0]


def read_export_metadata(path: str | Path) -> dict:
    """The metadata export_model wrote into an ONNX or TorchScript file."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        onnx = _require_onnx()
        graph = onnx.load(str(path), load_external_data=False)
        return {entry.key: json.loads(entry.value) for entry in graph.metadata_props}
    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[TORCHSCRIPT_METADATA_FILE])


def resolve_format(output: Path, format: str | None) -> str:
    if format is None:
        if output.suffix.lower() not in SUFFIX_FORMATS:
            raise UserError(f"cannot tell the format from '{output.name}'; add --format onnx or --format torchscript")
        return SUFFIX_FORMATS[output.suffix.lower()]
    format = format.lower()
    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    return format


@torch.no_grad()
def export_model(checkpoint: str | Path, output: str | Path, format: str | None = None) -> ExportResult:
    """Fuse a checkpoint's model, write it as ONNX or TorchScript and verify the file's outputs.

    format: "onnx" or "torchscript"; None picks it from the suffix (.onnx, .pt / .ts). Raises UserError (and
    keeps no file) when the fused model or the exported file differ from the PyTorch model by more than 1e-4
    relative to the largest logit.
    """
    from tresfinetune.models import fuse_for_inference
    from tresfinetune.models.from_checkpoint import load_trained_model

    output = Path(output).expanduser()
    format = resolve_format(output, format)
    if not output.parent.is_dir():
        raise UserError(f"the folder of --output '{output}' does not exist; create it first")
    if output.is_dir():
        raise UserError(f"--output '{output}' is a folder; give a file name such as model.{format[:4]}")
    if format == "onnx":
        _require_onnx()

    trained = load_trained_model(checkpoint)
    model = trained.model
    metadata = export_metadata(trained)
    fused = fuse_for_inference(model)
    example = sample_inputs(trained.info, SAMPLE_BATCH, seed=0)
    # Another batch size: the batch axis is dynamic.
    check_images = sample_inputs(trained.info, SAMPLE_BATCH + 1, seed=1)
    reference = model(check_images)
    fused_difference = relative_difference(fused(check_images), reference)
    _check(fused_difference, "the fused model")

    try:
        if format == "onnx":
            _export_onnx(fused, example, output, metadata)
            outputs, runtime = _run_onnx(output, check_images), "onnxruntime"
            if outputs is None:
                log.info("onnxruntime is not installed, so the ONNX file was only checked structurally")
                runtime = None
        else:
            _export_torchscript(fused, example, output, metadata)
            outputs, runtime = _run_torchscript(output, check_images), "torch.jit"
        file_difference = None if outputs is None else relative_difference(outputs, reference)
        if file_difference is not None:
            _check(file_difference, f"the exported {format} file run by {runtime}")
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return ExportResult(output, format, metadata, fused_difference, file_difference, runtime)
