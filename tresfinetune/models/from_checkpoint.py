"""load_trained_model: a trained run's model, ready for inference, and what using it needs, as values.

predict, evaluate and export all start here, so they agree on which weights a checkpoint means: the ones its
`inference` entry names ("model", or the EMA's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tresfinetune.checkpoint import RunInfo, load_checkpoint
from tresfinetune.errors import UserError
from tresfinetune.models.factory import create_model, head_arguments


@dataclass
class TrainedModel:
    model: nn.Module  # eval mode, no gradients
    info: RunInfo  # class names, task, input size, mean/std, thresholds, the run's recipe
    path: Path  # the checkpoint file it was read from

    @property
    def architecture(self) -> str:
        # A recipe may name the model with its weights tag (tresnet_m.miil_in1k); the architecture is the first part.
        return self.info.model_name.split(".", 1)[0]


def load_trained_model(path: str | Path, device: str | torch.device = "cpu") -> TrainedModel:
    """The model of a tresfinetune checkpoint, or of a run folder's best.pt (falling back to last.pt)."""
    ckpt = load_checkpoint(path, prefer="best.pt")
    architecture = ckpt.info.model_name.split(".", 1)[0]
    num_classes = len(ckpt.info.class_names)
    state_dict = ckpt.inference_state_dict()
    model = create_model(architecture, num_classes=num_classes, weights=None, **head_arguments(state_dict))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        first_line = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"the weights in '{ckpt.path}' do not fit a {architecture} with {num_classes} classes "
                        f"({first_line}); the file may be damaged") from None
    model.eval().requires_grad_(False).to(device)
    return TrainedModel(model, ckpt.info, ckpt.path)
