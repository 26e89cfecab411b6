"""ML-Decoder head: the computation of SPEC section 9, its key layout, loading ML_Decoder files, training, export."""

import logging
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from tresfinetune.errors import UserError
from tresfinetune.models import MLDecoderHead, create_model, describe_models, list_models
from tresfinetune.models.ml_decoder import group_size, num_groups
from tresfinetune.models.tresnet import ARCHITECTURES, TResNet

pytestmark = pytest.mark.usefixtures("torch_one_thread")  # see conftest.py

HEADS = 8


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every tensor away from its init (LayerNorm scales 1, biases 0 would hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.5)


def reference_logits(sd: dict, features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """SPEC section 9 written out with plain tensor ops (eval mode), one image and one group at a time."""
    p = "decoder."
    e = sd[p + "embed_standart.weight"].shape[0]
    d_head = e // HEADS

    def layer_norm(x, name):
        return F.layer_norm(x, (e,), sd[f"{p}layers.0.{name}.weight"], sd[f"{p}layers.0.{name}.bias"], 1e-5)

    w_q, w_k, w_v = sd[p + "layers.0.multihead_attn.in_proj_weight"].chunk(3)
    b_q, b_k, b_v = sd[p + "layers.0.multihead_attn.in_proj_bias"].chunk(3)
    queries = sd[p + "query_embed.weight"]
    pooling = sd[p + "duplicate_pooling"]
    logits = []
    for image in features:
        tokens = torch.relu(image.flatten(1).T @ sd[p + "embed_standart.weight"].T + sd[p + "embed_standart.bias"])
        t = layer_norm(queries + queries, "norm1")  # (G, E)
        q, k, v = t @ w_q.T + b_q, tokens @ w_k.T + b_k, tokens @ w_v.T + b_v
        heads = []
        for h in range(HEADS):
            part = slice(h * d_head, (h + 1) * d_head)
            weights = torch.softmax(q[:, part] @ k[:, part].T / math.sqrt(d_head), dim=-1)
            heads.append(weights @ v[:, part])
        attended = torch.cat(heads, 1) @ sd[p + "layers.0.multihead_attn.out_proj.weight"].T \
            + sd[p + "layers.0.multihead_attn.out_proj.bias"]
        t = layer_norm(t + attended, "norm2")
        hidden = torch.relu(t @ sd[p + "layers.0.linear1.weight"].T + sd[p + "layers.0.linear1.bias"])
        t = layer_norm(t + hidden @ sd[p + "layers.0.linear2.weight"].T + sd[p + "layers.0.linear2.bias"], "norm3")
        per_group = [t[g] @ pooling[g] for g in range(pooling.shape[0])]
        logits.append(torch.cat(per_group)[:num_classes] + sd[p + "duplicate_pooling_bias"])
    return torch.stack(logits)


@pytest.mark.parametrize("num_classes, groups, expected_groups, expected_d", [
    (7, None, 7, 1),  # unset: 100, capped at num_classes
    (250, None, 100, 3),  # unset, more classes than 100 groups: 2.5 -> 3 per group, 50 slots cut off
    (12, 4, 4, 3),  # set, dividing
    (10, 3, 3, 4),  # set, not dividing: 12 slots, the last 2 cut off
    (5, 9, 5, 1),  # set above num_classes: capped
])
def test_head_matches_the_formula(num_classes, groups, expected_groups, expected_d):
    torch.manual_seed(0)
    head = MLDecoderHead(num_features=12, num_classes=num_classes, groups=groups, embedding=16).double().eval()
    randomise(head)
    assert head.groups == expected_groups == num_groups(num_classes, groups)
    assert head.decoder.duplicate_pooling.shape == (expected_groups, 16, expected_d)
    features = torch.randn(3, 12, 3, 2, dtype=torch.float64)
    with torch.no_grad():
        got = head(features)
    expected = reference_logits(head.state_dict(), features, num_classes)
    assert got.shape == (3, num_classes)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_group_size_is_the_references_rounding():
    assert group_size(9605, 200) == 49 and group_size(80, 80) == 1 and group_size(100, 100) == 1
    assert group_size(10, 3) == 4 and group_size(196, 100) == 2


def test_training_mode_drops_out_and_keeps_the_queries_frozen():
    torch.manual_seed(0)
    head = MLDecoderHead(num_features=12, num_classes=6, groups=3, embedding=16).train()
    features = torch.randn(4, 12, 2, 2)
    first, second = head(features), head(features)
    assert not torch.allclose(first, second)  # dropout 0.1 in training
    first.sum().backward()
    assert head.decoder.query_embed.weight.grad is None
    assert not head.decoder.query_embed.weight.requires_grad
    trained = [n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(trained) == sum(p.requires_grad for p in head.parameters())
    head.eval()
    with torch.no_grad():
        torch.testing.assert_close(head(features), head(features), rtol=0, atol=0)


def test_state_dict_keys_are_the_references():
    with torch.device("meta"):
        model = TResNet(ARCHITECTURES["tresnet_m"], 9605, head="ml_decoder", head_groups=200)
    head = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("head.")}
    p = "head.decoder."
    assert head == {
        p + "embed_standart.weight": (768, 2048), p + "embed_standart.bias": (768,),
        p + "query_embed.weight": (200, 768),
        p + "duplicate_pooling": (200, 768, 49), p + "duplicate_pooling_bias": (9605,),
        **{p + f"layers.0.norm{i}.{t}": (768,) for i in (1, 2, 3) for t in ("weight", "bias")},
        p + "layers.0.multihead_attn.in_proj_weight": (2304, 768), p + "layers.0.multihead_attn.in_proj_bias": (2304,),
        p + "layers.0.multihead_attn.out_proj.weight": (768, 768), p + "layers.0.multihead_attn.out_proj.bias": (768,),
        p + "layers.0.linear1.weight": (2048, 768), p + "layers.0.linear1.bias": (2048,),
        p + "layers.0.linear2.weight": (768, 2048), p + "layers.0.linear2.bias": (768,),
    }
    assert not any(k.startswith("head.fc") for k in model.state_dict())


def test_tresnet_v2_xl():
    assert "tresnet_v2_xl" in list_models()
    with torch.device("meta"):
        assert sum(p.numel() for p in TResNet(ARCHITECTURES["tresnet_v2_xl"], 1000).parameters()) == 69_300_712
        assert sum(p.numel() for p in TResNet(ARCHITECTURES["tresnet_v2_xl"], 80).parameters()) == 67_415_632
        model = create_model("tresnet_v2_xl", num_classes=80, head="ml_decoder")
    assert [len(getattr(model.body, f"layer{i}")) for i in (1, 2, 3, 4)] == [3, 8, 34, 5]
    assert model.slopes == (1e-2, 1e-3) and model.head.groups == 80
    rows = {r["name"]: r for r in describe_models()}
    assert rows["tresnet_v2_xl"]["params"] == 69_300_712
    assert [t["tag"] for t in rows["tresnet_v2_xl"]["tags"]] == ["tresnet_v2_xl.mldecoder_coco_640"]
    assert {t["tag"] for t in rows["tresnet_v2_l"]["tags"]} >= {
        "tresnet_v2_l.mldecoder_coco_448", "tresnet_v2_l.mldecoder_stanford_cars", "tresnet_v2_l.mldecoder_in21k"}


def test_slopes_follow_the_code_that_trains_the_head():
    with torch.device("meta"):
        assert create_model("tresnet_v2_l").slopes == (1e-6, 1e-6)  # the TResNet code's V2, fc head
        assert create_model("tresnet_v2_l", head="ml_decoder").slopes == (1e-2, 1e-3)  # ML_Decoder's "tresnet_l"
        assert create_model("tresnet_m", head="ml_decoder").slopes == (1e-2, 1e-3)


# ---- ML_Decoder files -------------------------------------------------------------------------------------------


def shapes_only_file(path, name: str, num_classes: int, groups: int | None = None, head: str = "ml_decoder",
                     wrap: bool = True):
    """A file with the right keys and shapes whose tensors cost no memory (zero scalars expanded)."""
    with torch.device("meta"):
        model = TResNet(ARCHITECTURES[name], num_classes, head=head, head_groups=groups)
    state_dict = {k: torch.zeros(()).expand(v.shape) for k, v in model.state_dict().items()}
    torch.save({"model": state_dict} if wrap else state_dict, path)
    return path


@pytest.fixture(scope="module")
def open_images_model():
    """A TResNet-M with an OpenImages-size ML-Decoder head (9605 classes, 200 groups), random weights."""
    torch.manual_seed(0)
    model = create_model("tresnet_m", num_classes=9605, head="ml_decoder", head_groups=200).eval()
    randomise(model.head, seed=1)
    return model


@pytest.mark.parametrize("wrap", [True, False], ids=["model-dict", "plain"])
def test_ml_decoder_file_loads_with_its_groups(open_images_model, tmp_path, wrap):
    path = tmp_path / "tresnet_m_open_images_200_groups.pth"
    state_dict = open_images_model.state_dict()
    torch.save({"model": state_dict} if wrap else state_dict, path)
    model = create_model("tresnet_m", num_classes=None, weights=str(path)).eval()  # nothing but the file
    assert model.head_kind == "ml_decoder" and model.head.groups == 200 and model.num_classes == 9605
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = model(images)
        expected = reference_logits(model.head.state_dict(), model.forward_features(images), 9605)
        original = open_images_model(images)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(got, original)


def test_options_that_contradict_the_file_name_both(tmp_path):
    path = shapes_only_file(tmp_path / "oi.pth", "tresnet_m", 9605, groups=200)
    with pytest.raises(UserError, match=r"head_groups=100 contradicts .*oi.pth, whose ML-Decoder head has groups 200"):
        create_model("tresnet_m", num_classes=9605, weights=str(path), head_groups=100)
    with pytest.raises(UserError, match="head_embedding=512 contradicts .* embedding 768"):
        create_model("tresnet_m", weights=str(path), head_embedding=512, num_classes=None)


def test_wrong_backbone_for_a_file_names_the_right_one(tmp_path):
    path = shapes_only_file(tmp_path / "tresnet_l_COCO__448_90_0.pth", "tresnet_v2_l", 80)
    message = (r"holds tresnet_v2_l weights \(the ML_Decoder code's tresnet_l\), but the model is tresnet_l; "
               r"create a tresnet_v2_l model for this file")
    with pytest.raises(UserError, match=message):
        create_model("tresnet_l", weights=str(path))
    xl = shapes_only_file(tmp_path / "tresnet_xl_COCO_640_91_4.pth", "tresnet_v2_xl", 80, wrap=False)
    with pytest.raises(UserError, match="create a tresnet_v2_xl model"):
        create_model("tresnet_v2_l", weights=str(xl))


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")
def test_v2_file_with_ml_decoder_head_gets_the_ordinary_slopes(tmp_path):
    path = shapes_only_file(tmp_path / "tresnet_l_COCO__448_90_0.pth", "tresnet_v2_l", 80)
    with torch.device("meta"):
        model = create_model("tresnet_v2_l", num_classes=None, weights=str(path))
    assert model.slopes == (1e-2, 1e-3) and model.body.conv1[1].slope == 1e-2
    assert model.head_kind == "ml_decoder" and model.head.groups == 80 and model.num_classes == 80


def test_heads_of_the_other_kind_are_reinitialised_with_a_warning(tmp_path, caplog):
    torch.manual_seed(0)
    fc_model = create_model("tresnet_m", num_classes=1000)
    path = tmp_path / "in1k.pth"
    torch.save(fc_model.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="tresfinetune"):
        model = create_model("tresnet_m", num_classes=5, head="ml_decoder", weights=str(path))
    assert "1000-class head (pooling + fc)" in caplog.text and "re-initialised" in caplog.text
    assert isinstance(model.head, MLDecoderHead) and model.head.groups == 5
    assert torch.equal(model.body.layer3[2].conv2[0].weight, fc_model.body.layer3[2].conv2[0].weight)

    decoder_file = shapes_only_file(tmp_path / "coco.pth", "tresnet_m", 80)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tresfinetune"):
        fc_again = create_model("tresnet_m", num_classes=80, head="fc", weights=str(decoder_file))
        other_classes = create_model("tresnet_m", num_classes=20, weights=str(decoder_file))
    assert isinstance(fc_again.head.fc, torch.nn.Linear) and "80-class ML-Decoder head" in caplog.text
    assert other_classes.head_kind == "ml_decoder" and other_classes.head.groups == 20


def test_bad_head_arguments():
    with pytest.raises(UserError, match="unknown head 'mldecoder'"):
        create_model("tresnet_m", head="mldecoder")
    with pytest.raises(UserError, match="apply to the ml_decoder head only, and this model's head is fc"):
        create_model("tresnet_m", head="fc", head_groups=4)
    with pytest.raises(UserError, match="multiple of 8"):
        create_model("tresnet_m", head="ml_decoder", head_embedding=100)
    with pytest.raises(UserError, match="head_groups must be a positive integer"):
        create_model("tresnet_m", head="ml_decoder", head_groups=0)


# ---- training, checkpoints, evaluate, predict, export -------------------------------------------------------------


@pytest.fixture(scope="module")
def ml_decoder_run(tmp_path_factory):
    """A 1-epoch multi-label run with a small ML-Decoder head (1 group for 2 classes, embedding 16), resumed once."""
    from conftest import TINY_RUN, one_thread, write_colour_csv

    from tresfinetune.recipes import recipe_from_dict
    from tresfinetune.train import train

    base = tmp_path_factory.mktemp("ml_decoder")
    data_root = write_colour_csv(base / "halves")
    raw = dict(TINY_RUN, model={"name": "tresnet_m", "weights": "none", "head": "ml_decoder",
                                "head_options": {"groups": 1, "embedding": 16}},
               data={"name": "multilabel_csv", "root": str(data_root), "csv": "labels.csv", "val_fraction": 0.25},
               epochs=1)
    with one_thread():
        run_dir = train(recipe_from_dict(raw), output=base / "run", progress=False).run_dir
        shutil.copy(run_dir / "last.pt", base / "epoch1.pt")
        # Resuming must rebuild the head the run trained, whatever the recipe's default rule would give.
        train(resume=run_dir, overrides=["epochs=2", "model.head_options={}"], progress=False)
    return run_dir


def test_training_run_checkpoint_round_trip(ml_decoder_run):
    from tresfinetune.models.from_checkpoint import load_trained_model

    ckpt = torch.load(ml_decoder_run / "best.pt", weights_only=True)
    stored = ckpt["model"]
    assert stored["head.decoder.query_embed.weight"].shape == (1, 16)
    assert stored["head.decoder.duplicate_pooling"].shape == (1, 16, 2)
    assert len(ckpt["thresholds"]) == 2  # per-class thresholds, tuned on the validation set
    last = torch.load(ml_decoder_run / "last.pt", weights_only=True)
    first = torch.load(ml_decoder_run.parent / "epoch1.pt", weights_only=True)
    assert first["epoch"] == 1 and last["epoch"] == 2
    # The queries stay frozen through training and resuming; the rest of the head trains.
    for key in ("head.decoder.query_embed.weight", "head.decoder.embed_standart.weight"):
        frozen = key.endswith("query_embed.weight")
        assert torch.equal(first["model"][key], last["model"][key]) == frozen, key

    model = load_trained_model(ml_decoder_run).model
    assert isinstance(model.head, MLDecoderHead) and model.head.groups == 1 and model.head.embedding == 16
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key]), key
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = reference_logits(model.head.state_dict(), model.forward_features(images), 2)
        assert (model(images) - expected).abs().max() <= 1e-5 * expected.abs().max()
    # A tresfinetune checkpoint is also a weights file for a new run with the same head.
    again = create_model("tresnet_m", num_classes=None, weights=str(ml_decoder_run / "best.pt"))
    assert again.head.groups == 1 and again.pretrained_cfg["class_names"] == ["blue", "red"]


def test_evaluate_and_predict_with_the_head(ml_decoder_run, tmp_path):
    from tresfinetune.evaluate import evaluate
    from tresfinetune.predict import predict

    report = evaluate(ml_decoder_run, workers=0, plot=False).report
    assert 0 <= report["map"] <= 100 and [r["name"] for r in report["per_class"]] == ["blue", "red"]
    images = sorted((ml_decoder_run.parent / "halves").glob("img*.png"))[:3]
    result = predict(images, checkpoint=ml_decoder_run)
    assert len(result.predictions) == 3


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("suffix", [".onnx", ".ts"])
def test_export_matches_pytorch(ml_decoder_run, tmp_path, suffix):
    from tresfinetune.export import export_model, sample_inputs
    from tresfinetune.models.from_checkpoint import load_trained_model

    pytest.importorskip("onnxruntime")
    result = export_model(ml_decoder_run, tmp_path / f"model{suffix}")
    assert result.runtime == ("onnxruntime" if suffix == ".onnx" else "torch.jit")
    assert result.file_difference <= 1e-4 and result.fused_difference <= 1e-4

    trained = load_trained_model(ml_decoder_run)
    model = trained.model
    images = sample_inputs(trained.info, 5, seed=3)  # another batch size than the traced one
    with torch.no_grad():
        expected = model(images)
    if suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"image": images.numpy()})[0])
    else:
        with torch.no_grad():
            got = torch.jit.load(str(tmp_path / "model.ts"))(images)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_recipe_head_keys_are_validated():
    from tresfinetune.recipe import model_head_arguments
    from tresfinetune.recipes import recipe_from_dict

    recipe = recipe_from_dict({"model": {"head": "ml_decoder", "head_options": {"groups": 20, "embedding": 256}}})
    assert model_head_arguments(recipe) == {"head": "ml_decoder", "head_groups": 20, "head_embedding": 256}
    assert model_head_arguments(recipe_from_dict({})) == {"head": None}
    with pytest.raises(UserError, match="'model.head' must be one of fc, ml_decoder; got 'mldecoder'"):
        recipe_from_dict({"model": {"head": "mldecoder"}})
    with pytest.raises(UserError, match="'model.head_options' must be one of groups, embedding; got 'grups'; did you"):
        recipe_from_dict({"model": {"head": "ml_decoder", "head_options": {"grups": 20}}})
    with pytest.raises(UserError, match="'model.head_options.embedding' must be a positive integer, got 'big'"):
        recipe_from_dict({"model": {"head_options": {"embedding": "big"}}})
    with pytest.raises(UserError, match="'model.head_options.embedding' must be a multiple of 8 .*, got 100"):
        recipe_from_dict({"model": {"head_options": {"embedding": 100}}})
    with pytest.raises(UserError, match="applies to model.head: ml_decoder only"):
        recipe_from_dict({"model": {"head": "fc", "head_options": {"groups": 2}}})


def test_shipped_ml_decoder_recipes():
    from pathlib import Path

    from tresfinetune.recipes import load_recipe

    recipes = Path(__file__).parent.parent / "recipes"
    coco = load_recipe(recipes / "coco_mldecoder.yaml")
    assert (coco.model.name, coco.model.weights, coco.model.head) == ("tresnet_v2_l", "tresnet_v2_l.mldecoder_in21k",
                                                                       "ml_decoder")
    assert coco.input_size == 448 and coco.batch_size == 56 and coco.epochs == 40 and coco.ema == 0.9997
    csv = load_recipe(recipes / "multilabel_csv_mldecoder.yaml")
    assert (csv.model.name, csv.model.head, csv.input_size) == ("tresnet_m", "ml_decoder", 224)


@pytest.mark.slow
def test_torchrun_trains_the_head(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "tresnet_m", "weights": "none", "head": "ml_decoder", "head_options": {"embedding": 32}},
        "input_size": 32, "data": {"name": "digits", "limit": 32, "val_fraction": 0.25},
        "transforms": {"train": [{"Resize": {"height": 32, "width": 32}}],
                       "val": [{"Resize": {"height": 32, "width": 32}}]},
        "epochs": 1, "batch_size": 8, "workers": 0, "sync_bn": True, "optimizer": {"name": "sgd", "lr": 0.01},
    }))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "tresfinetune", "train", str(recipe), "-o", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "effective 16" in result.stdout
    stored = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    assert stored["head.decoder.query_embed.weight"].shape == (10, 32)  # 10 digit classes: 10 groups
