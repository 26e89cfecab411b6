"""TResNet models: architecture, heads (fc, ML-Decoder), InPlaceABN-style norm, weights in any layout, fusion."""

from tresfinetune.models.convert import (
    authors_to_ours,
    detect_layout,
    guess_architecture,
    ours_to_authors,
    ours_to_timm,
    timm_to_ours,
    to_ours,
)
from tresfinetune.models.factory import create_model, describe_models, head_arguments, list_models
from tresfinetune.models.from_checkpoint import TrainedModel, load_trained_model
from tresfinetune.models.fuse import fuse_for_inference
from tresfinetune.models.loading import load_weights, read_state_dict
from tresfinetune.models.ml_decoder import MLDecoderHead
from tresfinetune.models.norm import NormAct, convert_sync_norm
from tresfinetune.models.pretrained import PRETRAINED, download
from tresfinetune.models.tresnet import TResNet

__all__ = [
    "PRETRAINED",
    "MLDecoderHead",
    "NormAct",
    "TResNet",
    "TrainedModel",
    "authors_to_ours",
    "convert_sync_norm",
    "create_model",
    "describe_models",
    "detect_layout",
    "download",
    "fuse_for_inference",
    "guess_architecture",
    "head_arguments",
    "list_models",
    "load_trained_model",
    "load_weights",
    "ours_to_authors",
    "ours_to_timm",
    "read_state_dict",
    "timm_to_ours",
    "to_ours",
]
