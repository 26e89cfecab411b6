"""load_checkpoint_model: a trained run's model, ready for inference, with what it needs to be used attached.

predict, evaluate and export all start here, so they agree on which weights a checkpoint means: the ones its
`inference` entry names ("model", or "ema" whose state dict comes from the EMA wrapper and is prefixed "module.").
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tresfinetune.checkpoint import load_checkpoint, resolve_checkpoint_path
from tresfinetune.errors import UserError
from tresfinetune.models.loading import unwrap_state_dict

# Everything predict, evaluate and export need besides the weights; set as attributes on the model.
ATTACHED = ("class_names", "task", "input_size", "mean", "std", "thresholds")


def load_checkpoint_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The eval-mode model of a tresfinetune checkpoint, or of a run folder's best.pt (falling back to last.pt).

    Attributes attached: class_names, task, input_size, mean, std, thresholds (per-class list for multi-label
    runs, else None), model_name, checkpoint_path, and recipe (the run's recipe as a dict).
    """
    from tresfinetune.models.factory import create_model, head_arguments

    ckpt = load_checkpoint(resolve_checkpoint_path(path, prefer="best.pt"))
    missing = [key for key in ("model_name", "class_names", "task", "input_size") if key not in ckpt]
    if missing:
        raise UserError(f"'{ckpt['path']}' lacks {', '.join(missing)}; it was not written by tresfinetune train")
    # A recipe may name the model with its weights tag (tresnet_m.miil_in1k); the architecture is the first part.
    architecture = str(ckpt["model_name"]).split(".", 1)[0]
    state_dict = unwrap_state_dict(ckpt, ckpt["path"])[0]
    model = create_model(architecture, num_classes=len(ckpt["class_names"]), weights=None,
                         **head_arguments(state_dict))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first_line = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"the weights in '{ckpt['path']}' do not fit a {architecture} with "
                        f"{len(ckpt['class_names'])} classes ({first_line}); the file may be damaged") from None
    model.eval().requires_grad_(False).to(device)

    for key in ATTACHED:
        setattr(model, key, ckpt.get(key))
    model.class_names = [str(name) for name in ckpt["class_names"]]
    model.mean = list(ckpt.get("mean") or [0.0, 0.0, 0.0])
    model.std = list(ckpt.get("std") or [1.0, 1.0, 1.0])
    model.model_name = architecture
    model.checkpoint_path = Path(ckpt["path"])
    model.recipe = ckpt.get("recipe") or {}
    return model
