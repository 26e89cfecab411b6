"""benchmark: real training and inference steps at 32 px, batch 2; the batch search against a simulated GPU limit."""

import json

import pytest
import torch
from click.testing import CliRunner

from tresfinetune.cli import cli
from tresfinetune.errors import UserError
from tresfinetune.models import create_model
from tresfinetune.throughput import (
    BenchmarkResult,
    benchmark,
    estimated_cpu_batch,
    largest_cuda_batch,
    parse_batch_size,
    saved_activation_bytes,
)

# One thread: on a shared CPU, threads of one op wait for each other's preempted peers.
pytestmark = pytest.mark.usefixtures("torch_one_thread")


TINY = {"input_size": 32, "batch_size": 2, "steps": 1, "warmup": 0, "num_classes": 10, "threads": 1}


def test_measures_training_and_inference():
    result = benchmark("tresnet_m", **TINY)
    assert isinstance(result, BenchmarkResult)
    assert result.train_img_per_s > 0 and result.infer_img_per_s > 0
    assert result.batch_size == 2 and result.max_batch_size is None and result.device == "cpu"
    if result.memory_measure != "n/a":  # Linux: RSS is read from /proc
        # RSS growth only: in a process that already freed more than a step needs (earlier tests), it can be 0.
        assert result.train_peak_memory_mib is not None and result.train_peak_memory_mib >= 0


def test_fused_amp_channels_last_inference_only():
    result = benchmark("tresnet_m", fused=True, amp=True, channels_last=True, train=False, **TINY)
    assert result.fused and result.amp == "bfloat16" and result.channels_last
    assert result.train_img_per_s is None and result.infer_img_per_s > 0


def test_largest_batch_search_finds_the_limit_exactly():
    """Doubling then bisection against a step that runs out of memory above a (simulated) limit."""
    for limit in (2, 3, 37, 64, 100):
        tried = []

        def step(images, targets, limit=limit, tried=tried):
            tried.append(len(images))
            if len(images) > limit:
                raise torch.cuda.OutOfMemoryError("simulated")

        assert largest_cuda_batch(step, 32, 10, torch.device("cpu"), channels_last=False) == limit
        assert len(tried) <= 2 * limit.bit_length() + 2  # logarithmic, not a linear scan


def test_cpu_auto_batch_is_estimated_from_activation_memory():
    model = create_model("tresnet_m", num_classes=10)
    saved = {(batch, size): saved_activation_bytes(model.train(), torch.rand(batch, 3, size, size), None)
             for batch in (2, 4) for size in (32, 64)}
    per_image = {size: (saved[4, size] - saved[2, size]) / 2 for size in (32, 64)}
    # Weights are saved too, once per pass; what grows with the batch grows with the pixels, ~4x for 2x the side.
    assert 3 < per_image[64] / per_image[32] < 5
    batch, how = estimated_cpu_batch(model, 32, torch.device("cpu"), None)
    assert 2 <= batch <= 64 and "MiB of activations per training image" in how


def test_bad_arguments():
    assert parse_batch_size("auto") == "auto" and parse_batch_size("12") == 12
    with pytest.raises(UserError, match="whole number or 'auto'"):
        parse_batch_size("many")
    with pytest.raises(UserError, match="multiple of 16"):
        benchmark("tresnet_m", input_size=50)
    with pytest.raises(UserError, match="at least 2"):
        benchmark("tresnet_m", input_size=32, batch_size=1)
    with pytest.raises(UserError, match="unknown model"):
        benchmark("resnet50", input_size=32, batch_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    result = CliRunner().invoke(cli, ["benchmark", "--device", "cuda", "--input-size", "32"])
    assert result.exit_code == 1 and "no CUDA GPU" in result.output and "Traceback" not in result.output


def test_cli_table_and_json(tmp_path):
    result = CliRunner().invoke(cli, ["benchmark", "--input-size", "32", "--batch-size", "2", "--steps", "1",
                                      "--warmup", "0", "--threads", "1", "--fused", "--json", str(tmp_path / "b.json")],
                                env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "train img/s" in result.output and "infer img/s" in result.output and "fused inference" in result.output
    numbers = json.loads((tmp_path / "b.json").read_text())
    assert numbers["model"] == "tresnet_m" and numbers["infer_img_per_s"] > 0


def test_library_allocation_failures_count_as_out_of_memory():
    from tresfinetune.throughput import is_out_of_memory

    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))

    def step(images, targets):
        if len(images) > 5:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")

    assert largest_cuda_batch(step, 32, 10, torch.device("cpu"), channels_last=False) == 5


def test_amp_picks_fp16_on_gpus_without_native_bf16():
    from tresfinetune.runtime import half_dtype_for_capability

    assert half_dtype_for_capability((7, 0)) == torch.float16  # V100: bf16 only emulated
    assert half_dtype_for_capability((7, 5)) == torch.float16  # T4
    assert half_dtype_for_capability((8, 0)) == torch.bfloat16  # A100
    assert half_dtype_for_capability((9, 0)) == torch.bfloat16  # H100


def test_grad_checkpointing_trains_and_estimates_less_memory_per_image():
    result = benchmark("tresnet_m", grad_checkpointing=True, **TINY)
    assert result.grad_checkpointing and result.train_img_per_s > 0
    estimates = {}
    for checkpointing in (False, True):
        model = create_model("tresnet_m", num_classes=10)
        model.set_grad_checkpointing(checkpointing)
        estimates[checkpointing] = estimated_cpu_batch(model, 64, torch.device("cpu"), None)
    per_image = {k: float(how.split("~")[1].split(" MiB")[0]) for k, (_, how) in estimates.items()}
    # Segment inputs plus one recomputed segment: well under everything the plain model keeps.
    assert 0.05 * per_image[False] < per_image[True] < 0.6 * per_image[False]

def test_cli_grad_checkpointing_shows_the_trade(tmp_path):
    cli_result = CliRunner().invoke(cli, ["benchmark", "--input-size", "32", "--batch-size", "2", "--steps", "1",
                                          "--warmup", "0", "--threads", "1", "--grad-checkpointing", "--json",
                                          str(tmp_path / "b.json")], env={"COLUMNS": "160"})
    assert cli_result.exit_code == 0, cli_result.output
    assert "tresnet_m + grad checkpointing" in cli_result.output
    assert "activations per image" in cli_result.output and "training img/s" in cli_result.output
    numbers = json.loads((tmp_path / "b.json").read_text())
    assert not numbers["plain"]["grad_checkpointing"] and numbers["grad_checkpointing"]["grad_checkpointing"]
    assert numbers["trade"]["train_img_per_s"] == pytest.approx(
        numbers["grad_checkpointing"]["train_img_per_s"] / numbers["plain"]["train_img_per_s"])
    # Segment inputs plus one recomputed segment: well under half of what the plain model holds per image.
    assert 0.2 < numbers["trade"]["activation_memory"] < 0.5
