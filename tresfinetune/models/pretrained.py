"""Pretrained weights as configuration: where each tag's file lives, what it holds, and fetching it once.

A tag is `<model>.<weights>` (timm's naming). Each lists one or more sources tried in order: timm's Hugging Face
repository (model.safetensors), timm's older GitHub release file (its name carries a sha256 prefix) and the
authors' model zoo. Files land in the torch hub cache (`torch.hub.get_dir()/checkpoints`).

Environment overrides (for mirrors, air-gapped setups and tests):
- TRESFINETUNE_WEIGHTS_URL=<base>: fetch every tag from `<base>/<cache file name>` instead.
- TRESFINETUNE_WEIGHTS_URL_<TAG>=<url>: one tag (the tag upper-cased, non-alphanumerics as `_`).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tresfinetune import files
from tresfinetune.errors import UserError

logger = logging.getLogger("tresfinetune")

HF = "https://huggingface.co/timm/{tag}/resolve/main/model.safetensors"
GITHUB = "https://github.com/huggingface/pytorch-image-models/releases/download/v0.1-tresnet/{file}"
AUTHORS = "https://miil-public-eu.oss-eu-central-1.aliyuncs.com/model-zoo/{path}"
BASE_URL_ENV = "TRESFINETUNE_WEIGHTS_URL"
IN21K_CLASSES = 11221
OPEN_IMAGES_CLASSES = 9605


@dataclass(frozen=True)
class WeightsFile:
    url: str
    file_name: str  # name in the cache directory
    sha256_prefix: str | None = None  # leading hex digits of the file's sha256, when known


@dataclass(frozen=True)
class PretrainedWeights:
    tag: str
    sources: tuple[WeightsFile, ...]
    num_classes: int = 1000
    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    top1: float | None = None  # ImageNet-1k top-1 (%), where published
    note: str = ""

    @property
    def model_name(self) -> str:
        return self.tag.split(".", 1)[0]

    def config(self) -> dict:
        """The model's `pretrained_cfg` for these weights."""
        return {
            "tag": self.tag,
            "num_classes": self.num_classes,
            "input_size": self.input_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
        }


def default_config(input_size: int = 224, num_classes: int = 1000) -> dict:
    """`pretrained_cfg` of a model without pretrained weights: TResNet's preprocessing (no normalisation)."""
    return {"tag": None, "num_classes": num_classes, "input_size": input_size, "crop_pct": 0.875,
            "interpolation": "bilinear", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def _hub(tag: str) -> WeightsFile:
    return WeightsFile(HF.format(tag=tag), f"{tag}.safetensors")


def _github(file: str) -> WeightsFile:
    return WeightsFile(GITHUB.format(file=file), file, re.search(r"-([0-9a-f]{8})\.pth$", file)[1])


def _authors(tag: str, path: str) -> WeightsFile:
    return WeightsFile(AUTHORS.format(path=path), f"{tag}.pth")


def _ml_decoder(tag: str, file: str, num_classes: int, input_size: int, note: str) -> PretrainedWeights:
    return PretrainedWeights(tag, (_authors(tag, f"ML_Decoder/{file}"),), num_classes=num_classes,
                             input_size=input_size, crop_pct=1.0, note=note)


_WEIGHTS = [
    PretrainedWeights("tresnet_m.miil_in1k", (_hub("tresnet_m.miil_in1k"),), top1=80.8),
    PretrainedWeights("tresnet_m.miil_in21k_ft_in1k", (
        _hub("tresnet_m.miil_in21k_ft_in1k"), _github("tresnet_m_1k_miil_83_1-d236afcb.pth")), top1=83.1),
    PretrainedWeights("tresnet_m.miil_in21k", (
        _hub("tresnet_m.miil_in21k"), _github("tresnet_m_miil_in21k-901b6ed4.pth")),
        num_classes=IN21K_CLASSES, note="ImageNet-21K-P, 11221 classes"),
    PretrainedWeights("tresnet_l.miil_in1k", (
        _hub("tresnet_l.miil_in1k"), _github("tresnet_l_81_5-235b486c.pth")), top1=81.5),
    PretrainedWeights("tresnet_xl.miil_in1k", (
        _hub("tresnet_xl.miil_in1k"), _github("tresnet_xl_82_0-a2d51b00.pth")), top1=82.1),
    PretrainedWeights("tresnet_m.miil_in1k_448", (
        _hub("tresnet_m.miil_in1k_448"), _github("tresnet_m_448-bc359d10.pth")), input_size=448, top1=81.7),
    PretrainedWeights("tresnet_l.miil_in1k_448", (
        _hub("tresnet_l.miil_in1k_448"), _github("tresnet_l_448-940d0cd1.pth")), input_size=448, top1=82.3),
    PretrainedWeights("tresnet_xl.miil_in1k_448", (
        _hub("tresnet_xl.miil_in1k_448"), _github("tresnet_xl_448-8c1815de.pth")), input_size=448, top1=83.1),
    PretrainedWeights("tresnet_v2_l.miil_in21k_ft_in1k", (
        _hub("tresnet_v2_l.miil_in21k_ft_in1k"), _github("tresnet_l_v2_83_9-f36e4445.pth")), top1=83.9),
    PretrainedWeights("tresnet_v2_l.miil_in21k", (_hub("tresnet_v2_l.miil_in21k"),),
                      num_classes=IN21K_CLASSES, note="ImageNet-21K-P, 11221 classes"),
    # The authors' own model zoo (their bucket has at times answered "forbidden").
    PretrainedWeights("tresnet_m.authors_in1k", (_authors("tresnet_m.authors_in1k", "tresnet/tresnet_m.pth"),),
                      top1=80.8),
    PretrainedWeights("tresnet_l.authors_in1k", (_authors("tresnet_l.authors_in1k", "tresnet/tresnet_l.pth"),),
                      top1=81.5),
    PretrainedWeights("tresnet_xl.authors_in1k", (_authors("tresnet_xl.authors_in1k", "tresnet/tresnet_xl.pth"),),
                      top1=82.0),
    PretrainedWeights("tresnet_m.authors_in1k_448", (
        _authors("tresnet_m.authors_in1k_448", "tresnet/tresnet_m_448.pth"),), input_size=448),
    PretrainedWeights("tresnet_l.authors_in1k_448", (
        _authors("tresnet_l.authors_in1k_448", "tresnet/tresnet_l_448.pth"),), input_size=448),
    PretrainedWeights("tresnet_xl.authors_in1k_448", (
        _authors("tresnet_xl.authors_in1k_448", "tresnet/tresnet_xl_448.pth"),), input_size=448),
    PretrainedWeights("tresnet_m.authors_in21k", (
        _authors("tresnet_m.authors_in21k", "ImageNet_21K_P/models/tresnet_m_miil_21k.pth"),),
        num_classes=IN21K_CLASSES, note="ImageNet-21K-P, 11221 classes"),
    PretrainedWeights("tresnet_v2_l.authors_in21k", (
        _authors("tresnet_v2_l.authors_in21k", "ImageNet_21K_P/models/tresnet_l_v2_miil_21k.pth"),),
        num_classes=IN21K_CLASSES, note="ImageNet-21K-P, 11221 classes"),
    PretrainedWeights("tresnet_v2_l.authors_stanford_cars", (
        _authors("tresnet_v2_l.authors_stanford_cars", "tresnet/stanford_cars_tresnet-l-v2_96_27.pth"),),
        num_classes=196, input_size=368, crop_pct=1.0, note="Stanford Cars, 96.27%"),
    # The ML_Decoder zoo: ML-Decoder heads (create_model picks head='ml_decoder' and its groups from the file).
    # Their "tresnet_l" / "tresnet_xl" are our V2 layouts; the inputs were squish-resized (crop_pct 1).
    _ml_decoder("tresnet_m.mldecoder_coco", "tresnet_m_COCO_224_84_2.pth", 80, 224, "MS-COCO, ML-Decoder, 84.2 mAP"),
    _ml_decoder("tresnet_v2_l.mldecoder_coco_448", "tresnet_l_COCO__448_90_0.pth", 80, 448,
                "MS-COCO, ML-Decoder, 90.1 mAP"),
    _ml_decoder("tresnet_v2_xl.mldecoder_coco_640", "tresnet_xl_COCO_640_91_4.pth", 80, 640,
                "MS-COCO, ML-Decoder, 91.4 mAP"),
    _ml_decoder("tresnet_m.mldecoder_open_images", "tresnet_m_open_images_200_groups_86_8.pth", OPEN_IMAGES_CLASSES,
                224, "OpenImages, ML-Decoder 200 groups, 86.8 mAP"),
    _ml_decoder("tresnet_v2_l.mldecoder_stanford_cars", "tresnet_l_stanford_card_96.41.pth", 196, 384,
                "Stanford Cars, ML-Decoder, 96.41%"),
    _ml_decoder("tresnet_v2_l.mldecoder_in21k", "tresnet_l_pretrain_ml_decoder.pth", IN21K_CLASSES, 224,
                "ImageNet-21K-P backbone the ML-Decoder COCO recipe starts from"),
]

PRETRAINED: dict[str, PretrainedWeights] = {w.tag: w for w in _WEIGHTS}


def tags_for(model_name: str) -> list[PretrainedWeights]:
    return [w for w in PRETRAINED.values() if w.model_name == model_name]


def cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _override_url(weights: PretrainedWeights, source: WeightsFile) -> str:
    per_tag = os.environ.get(f"{BASE_URL_ENV}_{re.sub(r'[^A-Za-z0-9]', '_', weights.tag).upper()}")
    if per_tag:
        return per_tag
    base = os.environ.get(BASE_URL_ENV)
    return f"{base.rstrip('/')}/{source.file_name}" if base else source.url


def download(tag: str) -> Path:
    """Path of the tag's weights file in the cache, fetching it first if needed (hash checked where known)."""
    weights = PRETRAINED.get(tag)
    if weights is None:
        raise UserError(f"unknown weights tag {tag!r}; known tags: {', '.join(PRETRAINED)}")
    failures = []
    for source in weights.sources:
        path = cache_dir() / source.file_name
        if path.is_file():
            return path
        url = _override_url(weights, source)
        logger.info("Downloading %s from %s", tag, url)
        try:
            return files.download(url, path, tag, "sha256" if source.sha256_prefix else None, source.sha256_prefix,
                                  hint=files.WEIGHTS_HINT)
        except files.DownloadError as e:
            failures.append(str(e))
    raise UserError(f"could not download {tag} ({'; '.join(failures)}); {files.WEIGHTS_HINT}")
