"""Augmentation pipelines: recipe validation, defaults by input size, Cutout / RandAugment, seeding."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from tresfinetune.datasets.transforms import (
    Cutout,
    RandAugment,
    build_transforms,
    default_spec,
    fill_sizes,
    to_model_input,
    validate_pipeline,
)
from tresfinetune.errors import UserError
from tresfinetune.recipes import recipe_from_dict


def recipe(**raw):
    return recipe_from_dict({"model": {"name": "tresnet_m"}, **raw})


def photo(height: int = 60, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("spec, message", [
    ([{"RandomResizeCrop": {"size": [8, 8]}}], r"transforms.train\[0\]: unknown transform 'RandomResizeCrop'; "
                                               r"did you mean 'RandomResizedCrop'\?"),
    (["HorizontalFlip", {"RandomResizedCrop": {"sise": [8, 8]}}], r"\[1\]: unknown argument 'sise' for "
                                                                  r"RandomResizedCrop; did you mean 'size'\?"),
    ([{"RandomResizedCrop": {"size": 448}}], r"\[0\]: bad arguments for RandomResizedCrop: argument 'size'"),
    ([{"HorizontalFlip": {"p": 1.5}}], r"argument 'p'.*less than or equal to 1"),
    ([{"Cutout": {"size": 2}}], r"bad arguments for Cutout: size must be a fraction"),
    ([{"Cutout": {"colour": "red"}}], r"unknown argument 'colour' for Cutout; valid arguments: p, size, fill"),
    ([{"OneOf": {"transforms": ["Blurr"]}}], r"\[0\].transforms\[0\]: unknown transform 'Blurr'"),
    (["Normalize"], r"remove 'Normalize'"),
    ([{"HorizontalFlip": 0.5}], r"arguments of 'HorizontalFlip' must be a mapping"),
    ({"HorizontalFlip": {}}, r"must be a list"),
])
def test_validate_pipeline_names_the_bad_entry(spec, message):
    with pytest.raises(UserError, match=message):
        validate_pipeline(spec, where="transforms.train")


def test_recipe_loading_validates_transforms():
    good = recipe(transforms={"train": [{"RandomResizedCrop": {"size": [64, 64]}}, "HorizontalFlip",
                                        {"Cutout": {"p": 0.5}}, {"RandAugment": {"num_ops": 2, "magnitude": 9}}]})
    assert len(good.transforms.train) == 4
    with pytest.raises(UserError, match=r"transforms.val\[0\]: unknown transform"):
        recipe(transforms={"val": [{"CentreCrop": {"height": 8, "width": 8}}]})


def test_default_eval_at_224_resizes_shorter_side_then_centre_crops():
    pipeline = build_transforms(recipe(input_size=224, data={"name": "folder"}), train=False)
    image = photo(300, 400)
    expected = cv2.resize(image, (341, 256), interpolation=cv2.INTER_LINEAR)[16:240, 58:282]  # 256 = 224 / 0.875
    out = pipeline(image)
    assert out.shape == (224, 224, 3) and out.dtype == torch.uint8
    assert (out.int() - torch.from_numpy(expected).int()).abs().max() <= 1


def test_default_eval_at_448_squishes_and_multilabel_always_squishes():
    assert fill_sizes(default_spec(448, train=False), 448) == [{"Resize": {"height": 448, "width": 448}}]
    assert fill_sizes(default_spec(224, train=False, multi_label=True), 224) == [
        {"Resize": {"height": 224, "width": 224}}]
    pipeline = build_transforms(recipe(input_size=64, data={"name": "voc2007"}), train=False)
    image = photo(30, 90)
    expected = cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR)
    assert torch.equal(pipeline(image), torch.from_numpy(expected))


def test_default_train_pipelines():
    single = fill_sizes(default_spec(224, train=True), 224)
    assert single[0]["RandomResizedCrop"]["size"] == [224, 224] and {"HorizontalFlip": {"p": 0.5}} in single
    assert "Cutout" in str(default_spec(448, train=True, multi_label=True))
    digits = build_transforms(recipe(input_size=32, data={"name": "digits"}), train=True)
    assert "HorizontalFlip" not in repr(digits)  # mirrored digits are other digits
    out = digits(photo(32, 32))
    assert out.shape == (32, 32, 3) and out.dtype == torch.uint8


def test_batches_become_model_input_in_0_1_with_mean_and_std():
    batch = torch.stack([torch.full((4, 4, 3), 255, dtype=torch.uint8), torch.zeros(4, 4, 3, dtype=torch.uint8)])
    batch[0, 1, 2] = torch.tensor([0, 51, 102], dtype=torch.uint8)  # one pixel, to check the NHWC -> NCHW layout
    plain = to_model_input(batch, torch.device("cpu"), [0, 0, 0], [1, 1, 1])
    assert plain.shape == (2, 3, 4, 4) and plain.dtype == torch.float32 and plain.max() == 1 and plain.min() == 0
    assert torch.allclose(plain[0, :, 1, 2], torch.tensor([0.0, 0.2, 0.4]))
    normalised = to_model_input(batch, torch.device("cpu"), [0.5, 0.5, 0.5], [0.25, 0.5, 1.0],
                                memory_format=torch.channels_last)
    assert torch.allclose(normalised[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    assert torch.allclose(normalised[1, :, 0, 0], torch.tensor([-2.0, -1.0, -0.5]))
    assert normalised.is_contiguous(memory_format=torch.channels_last)


def test_pipeline_must_keep_uint8_pixels():
    with pytest.raises(UserError, match=r"transforms.val turns images into torch.float32 pixels; keep them uint8"):
        build_transforms(recipe(input_size=32, transforms={"val": [{"Resize": {"height": 32, "width": 32}},
                                                                   {"ToFloat": {}}]}), train=False)


def test_pipeline_must_end_at_input_size():
    with pytest.raises(UserError, match=r"transforms.train makes .* images but input_size is 64; end the list"):
        build_transforms(recipe(input_size=64, transforms={"train": ["HorizontalFlip"]}), train=True)


def test_reseed_makes_augmentation_a_function_of_the_keys():
    pipeline = build_transforms(recipe(input_size=32, transforms={"train": [
        {"RandomResizedCrop": {"size": [32, 32]}}, "HorizontalFlip", {"RandAugment": {"magnitude": 9}},
        {"Cutout": {"p": 0.5}}]}), train=True)
    image = photo(50, 70)
    outputs = {}
    for keys in [(0, 0, 1), (0, 0, 1), (0, 1, 1), (1, 0, 1), (0, 0, 2)]:
        pipeline.reseed(*keys)
        out = pipeline(image)
        if keys in outputs:
            assert torch.equal(out, outputs[keys])
        outputs[keys] = out
    assert len({o.numpy().tobytes() for o in outputs.values()}) == 4


def test_cutout_cuts_one_half_size_box_of_one_colour():
    image = np.zeros((40, 60, 3), np.uint8)
    cutout = Cutout(p=1.0)
    cutout.set_random_seed(3)
    for _ in range(5):
        out = cutout(image=image)["image"]
        changed = np.argwhere((out != 0).any(axis=2))
        (top, left), (bottom, right) = changed.min(axis=0), changed.max(axis=0)
        assert (bottom - top + 1, right - left + 1) == (20, 30)
        box = out[top:bottom + 1, left:right + 1].reshape(-1, 3)
        assert (box == box[0]).all()  # a single random colour
    assert (Cutout(p=0.0)(image=image)["image"] == 0).all()


def test_randaugment_policy_runs_at_every_magnitude():
    image = photo(48, 48)
    for magnitude in (0, 5, 10):
        policy = RandAugment(num_ops=3, magnitude=magnitude)
        policy.set_random_seed(0)
        changed = 0
        for _ in range(10):
            out = policy(image=image)["image"]
            assert out.shape == image.shape and out.dtype == np.uint8
            changed += not np.array_equal(out, image)
        if magnitude:
            assert changed > 0
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=11)


def test_sizes_left_out_come_from_input_size():
    spec = [{"RandomResizedCrop": {"scale": [0.3, 1.0]}}, "HorizontalFlip", {"Cutout": {"p": 0.5}}]
    assert fill_sizes(spec, 64) == [{"RandomResizedCrop": {"scale": [0.3, 1.0], "size": [64, 64]}},
                                    "HorizontalFlip", {"Cutout": {"p": 0.5}}]
    # a resize before a fixed-size crop keeps the crop_pct margin; alone or before a random resized crop it squishes
    assert fill_sizes([{"SmallestMaxSize": {}}, "HorizontalFlip", {"CenterCrop": {}}], 224) == [
        {"SmallestMaxSize": {"max_size": 256}}, "HorizontalFlip", {"CenterCrop": {"height": 224, "width": 224}}]
    assert fill_sizes([{"Resize": {}}, {"CenterCrop": {}}], 448, crop_pct=0.8) == [
        {"Resize": {"height": 560, "width": 560}}, {"CenterCrop": {"height": 448, "width": 448}}]
    assert fill_sizes(["Resize", {"RandomResizedCrop": {}}], 64) == [
        {"Resize": {"height": 64, "width": 64}}, {"RandomResizedCrop": {"size": [64, 64]}}]
    # written sizes win, argument by argument; nested lists are filled too; the input is not modified
    written = [{"Resize": {"height": 100}}, {"OneOf": {"transforms": [{"RandomCrop": {}}, {"CenterCrop": {}}]}}]
    assert fill_sizes(written, 64) == [
        {"Resize": {"height": 100, "width": 73}},
        {"OneOf": {"transforms": [{"RandomCrop": {"height": 64, "width": 64}},
                                  {"CenterCrop": {"height": 64, "width": 64}}]}}]
    assert written[0] == {"Resize": {"height": 100}} and written[1]["OneOf"]["transforms"][0] == {"RandomCrop": {}}


def test_eval_resize_follows_crop_pct_from_the_recipe():
    pipeline = build_transforms(recipe(input_size=64, transforms={
        "crop_pct": 0.8, "val": [{"SmallestMaxSize": {}}, {"CenterCrop": {}}]}), train=False)
    image = photo(100, 150)
    expected = cv2.resize(image, (120, 80), interpolation=cv2.INTER_LINEAR)[8:72, 28:92]  # 80 = 64 / 0.8
    assert torch.equal(pipeline(image), torch.from_numpy(expected))
    squish = build_transforms(recipe(input_size=64, transforms={"val": [{"Resize": {}}]}), train=False)
    assert torch.equal(squish(image), torch.from_numpy(cv2.resize(image, (64, 64), interpolation=cv2.INTER_LINEAR)))
    with pytest.raises(UserError, match=r"'transforms.crop_pct' must be in \(0, 1\]"):
        recipe(transforms={"crop_pct": 1.5})


def test_written_sizes_that_miss_input_size_still_fail_clearly():
    with pytest.raises(UserError, match=r"transforms.val makes 32x32 images but input_size is 64"):
        build_transforms(recipe(input_size=64, transforms={"val": [{"Resize": {"height": 32, "width": 32}}]}),
                         train=False)
    with pytest.raises(UserError, match=r"transforms.train makes 48x48 images but input_size is 64"):
        build_transforms(recipe(input_size=64, transforms={"train": [{"Resize": {}}, {"CenterCrop": {"height": 48,
                                                                                                  "width": 48}}]}),
                         train=True)
