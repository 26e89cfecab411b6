"""Fine-tune ImageNet-pretrained TResNet models."""

__version__ = "0.1.0"
