"""Fused vs unfused eval model on the CPU: img/s and whether the outputs agree.

    python benchmarks/fused_inference.py [--model tresnet_m] [--size 224] [--batch 8] [--iters 5] [--threads 1]
                                         [--channels-last] [--wall]

Three ways to run the eval model: "unfused" runs every unit as conv, norm, activation; "model.eval()" is the model
as it is (TResNet's conv-norm units fold their norm on the fly in inference and cache the result); "fused" is
tresfinetune.models.fuse_for_inference(model): every norm folded into its conv once, the anti-alias blur a fixed
depthwise conv, plain nn layers only (what export writes). Norm statistics and weights are randomised first (a freshly
initialised model has identity norms, which would make the comparison of outputs too easy). Timings are
interleaved (unfused, fused, unfused, ...) after a warm-up and the median is reported, so drifting machine load
hits both alike. Time is the process's CPU time by default: with one thread that is the work done, while on a
shared machine wall time mostly measures the neighbours (--wall uses wall time, right for several threads on an
idle machine). --channels-last adds both models in NHWC layout. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from timing import interleaved_seconds

from tresfinetune.models import NormAct, create_model, fuse_for_inference
from tresfinetune.models.tresnet import ConvNormAct


def randomise_norms(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, NormAct):
            n = layer.num_features
            layer.weight.data = torch.randn(n, generator=generator)
            layer.bias.data = torch.randn(n, generator=generator) * 0.1
            layer.running_mean.data = torch.randn(n, generator=generator) * 0.1
            layer.running_var.data = torch.rand(n, generator=generator) + 0.5


def layer_by_layer(model: torch.nn.Module) -> torch.nn.Module:
    """A copy that runs every conv-norm-act unit as conv, then norm, then activation (no folding anywhere)."""
    unfolded = copy.deepcopy(model)
    for unit in unfolded.modules():
        if isinstance(unit, ConvNormAct):
            unit.forward = lambda x, unit=unit: unit[1](unit[0](x))
    return unfolded


def channels_last_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tresnet_m")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of process CPU time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = create_model(args.model, num_classes=1000).eval()
    randomise_norms(model)
    fused = fuse_for_inference(model)
    images = torch.rand(args.batch, 3, args.size, args.size)
    unfused = layer_by_layer(model)
    variants = {"unfused": (unfused, images), "model.eval()": (model, images), "fused": (fused, images)}
    if args.channels_last:
        nhwc = images.contiguous(memory_format=torch.channels_last)
        for name, (net, _) in list(variants.items()):
            variants[f"{name}, channels_last"] = (channels_last_copy(net), nhwc)

    with torch.inference_mode():
        reference = unfused(images)
        differences = {}
        for name, (net, x) in variants.items():
            out = net(x)  # also the warm-up
            differences[name] = ((out - reference).abs().max() / reference.abs().max()).item()
        steps = {name: (lambda net=net, x=x: net(x)) for name, (net, x) in variants.items()}
        seconds = interleaved_seconds(steps, args.iters, time.perf_counter if args.wall else time.process_time)

    clock = "wall time" if args.wall else "process CPU time"
    print(f"{args.model} at {args.size}px, batch {args.batch}, {args.threads} thread(s), median of {args.iters} "
          f"({clock}), torch {torch.__version__}")
    print("| variant | img/s | speed-up vs unfused | max relative difference |\n|---|---|---|---|")
    base = args.batch / seconds["unfused"]
    for name in variants:
        speed = args.batch / seconds[name]
        print(f"| {name} | {speed:.1f} | {speed / base:.2f}x | {differences[name]:.1e} |")


if __name__ == "__main__":
    main()
