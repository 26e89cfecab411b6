"""fuse_for_inference: norms folded into convs, blur as a fixed conv, same outputs."""

import torch

from tresfinetune.models import create_model, fuse_for_inference
from tresfinetune.models.norm import NormAct
from tresfinetune.models.tresnet import AntiAliasDownsample


def test_fused_model_has_standard_layers_and_equal_outputs():
    torch.manual_seed(0)
    model = create_model("tresnet_m", num_classes=4).eval()
    with torch.no_grad():
        for i, norm in enumerate(model.norm_layers()):
            norm.weight.uniform_(-1, 1)
            norm.bias.uniform_(-0.2, 0.2)
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 1.5)
            norm.plain_bn = i % 7 == 3  # some layers with plain BatchNorm scales (timm fine-tuned files)
    x = torch.rand(2, 3, 64, 64)
    with torch.enable_grad():
        want = model(x).detach()  # the unfused path (the inference cache folds too)

    fused = fuse_for_inference(model)
    assert not any(isinstance(m, NormAct | AntiAliasDownsample) for m in fused.modules())
    leaf_types = {type(m).__name__ for m in fused.modules() if not list(m.children())}
    assert leaf_types <= {"Conv2d", "ConvLeakyReLU", "AvgPool2d", "Linear", "SpaceToDepth"}
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())
    with torch.no_grad():
        got = fused(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert any(isinstance(m, NormAct) for m in model.modules())  # the original is untouched
