"""One-shot GPU check: the paths only a GPU runs (AMP fp16/bf16, channels_last, compile, NCCL, pinned memory).

    python benchmarks/gpu_check.py [--json FILE] [--budget-s 450]     # on a CUDA machine, about 8 minutes at most
    python benchmarks/gpu_check.py --cpu-smoke                        # every code path at tiny sizes, on the CPU

Prints a markdown table and then the same numbers as JSON:
1. ours vs timm for tresnet_m / tresnet_l / tresnet_xl at 224 px and tresnet_l at 448 px, channels_last, AMP bf16
   and fp16, eager and torch.compile: training and inference img/s (SGD steps and inference_mode forwards on random
   images, the way `tresfinetune benchmark` measures) and peak memory (torch.cuda.max_memory_allocated).
2. The largest training batch of TResNet-M at 224 px (bf16, channels_last), with and without grad checkpointing,
   also scaled to a 16 GiB card (the paper's V100 figure is 512); `search_cap_reached` when the search stopped at
   tresfinetune.throughput.CUDA_SEARCH_LIMIT images rather than at an out-of-memory error.
3. `tresfinetune train recipes/digits.yaml --set device=cuda epochs=2` (pinned-memory loader, autocast, EMA-free):
   the training loss must fall (epoch 2 below epoch 1 and below ln 10, the loss of a blank head).
4. `torchrun --nproc-per-node 1` of a DDP worker on the NCCL backend (sync norms, grad checkpointing, autocast) on
   the digits: the mean loss of its last steps must be below that of its first steps. (`tresfinetune train` under
   a one-process torchrun is a world of one and starts no process group, so the worker is this script's own.)

Rows run in that order; the compiled rows, last, are skipped once --budget-s would be exceeded (each compilation
takes tens of seconds), and the skip is reported. The exit status is 1 when any check failed or any row raised.
--cpu-smoke runs the same code at 32 px with batch 2, one step, the compiler's "eager" backend (tracing without
code generation), a simulated memory limit for the batch search, gloo for the process group and a few digits;
tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from a checkout

from tresfinetune.throughput import (  # noqa: E402
    CUDA_SEARCH_LIMIT,
    PeakMemory,
    largest_cuda_batch,
    make_infer_step,
    make_train_step,
    time_steps,
)

MODELS = (("tresnet_m", 224), ("tresnet_l", 224), ("tresnet_xl", 224), ("tresnet_l", 448))
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
V100_GIB = 16
FIRST_COMPILE_ESTIMATE_S = 60  # a compiled row (inference and training graphs) on a GPU, before one has been timed


@dataclass
class Settings:
    device: torch.device
    batch: dict[int, int]  # input size -> batch
    steps: int
    warmup: int
    compile_backend: str
    models: tuple[tuple[str, int], ...]
    smoke: bool


@dataclass
class Row:
    impl: str
    model: str
    input_size: int
    amp: str
    compile: bool
    batch: int
    train_img_per_s: float | None = None
    infer_img_per_s: float | None = None
    train_peak_mib: float | None = None
    infer_peak_mib: float | None = None
    seconds: float | None = None
    status: str = "ok"  # ok | skipped: ... | error: ...


@dataclass
class Report:
    environment: dict
    rows: list[Row] = field(default_factory=list)
    largest_batch: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)


def build(impl: str, name: str, device: torch.device, grad_checkpointing: bool = False) -> torch.nn.Module:
    if impl == "timm":
        import timm

        model = timm.create_model(name, num_classes=1000)
    else:
        from tresfinetune.models import create_model

        model = create_model(name, num_classes=1000)
    model.set_grad_checkpointing(grad_checkpointing)
    return model.to(device).to(memory_format=torch.channels_last)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, 1000, (batch,), device=device)


def measure(row: Row, settings: Settings) -> None:
    """Inference then training img/s and peak memory of one row, filled in place."""
    device, amp = settings.device, AMP[row.amp]
    started = time.perf_counter()
    model = build(row.impl, row.model, device)
    batch = random_batch(row.batch, row.input_size, device)
    runs = {"infer": (model.eval(), make_infer_step), "train": (model, make_train_step)}
    for phase, (net, make_step) in runs.items():
        net = net.train(phase == "train")
        if row.compile:
            net = torch.compile(net, backend=settings.compile_backend)
        step = make_step(net, device, amp)
        with PeakMemory(device) as memory:
            step(*batch)  # compilation, cuDNN autotuning, optimizer state: untimed
            speed = time_steps(step, batch, device, settings.warmup, settings.steps)
        setattr(row, f"{phase}_img_per_s", speed)
        setattr(row, f"{phase}_peak_mib", memory.mib)
        del step, net
    del model, runs, batch
    if row.compile:
        torch._dynamo.reset()
    free(device)
    row.seconds = time.perf_counter() - started


def run_rows(report: Report, settings: Settings, compiled: bool, deadline: float) -> None:
    last_compiled_seconds = 0.0 if settings.smoke else FIRST_COMPILE_ESTIMATE_S
    # The CPU smoke compiles one precision only: the other takes the same code path, and tracing is its slow part.
    amps = ["bf16"] if compiled and settings.smoke else list(AMP)
    for name, size in settings.models:
        for amp in amps:
            for impl in ("ours", "timm"):
                row = Row(impl, name, size, amp, compiled, settings.batch[size])
                report.rows.append(row)
                left = deadline - time.perf_counter()
                if compiled and left < 1.2 * last_compiled_seconds:
                    row.status = f"skipped: {left:.0f} s of the time budget left"
                    continue
                try:
                    measure(row, settings)
                except Exception as e:  # one failing row must not hide the others
                    row.status = f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e) else ''}"
                    free(settings.device)
                if compiled and row.seconds:
                    last_compiled_seconds = max(last_compiled_seconds, row.seconds)
                print(f"  {impl} {name} {size}px {amp} {'compiled' if compiled else 'eager'}: {row.status}",
                      flush=True)


def largest_batches(report: Report, settings: Settings) -> None:
    """TResNet-M 224 bf16 channels_last, with and without grad checkpointing (CPU smoke: a simulated limit)."""
    device = settings.device
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    for checkpointing in (False, True):
        key = "grad_checkpointing" if checkpointing else "plain"
        try:
            model = build("ours", "tresnet_m", device, checkpointing).train()
            step = make_train_step(model, device, torch.bfloat16)
            if settings.smoke:
                step = _with_simulated_memory_limit(step, 5 if checkpointing else 3)
            found = largest_cuda_batch(step, 224 if not settings.smoke else 32, 1000, device, channels_last=True)
            result = {"largest_batch": found, "search_cap_reached": found >= CUDA_SEARCH_LIMIT}
            if total:
                result["scaled_to_16_gib"] = int(found * V100_GIB * 2**30 / total)
            report.largest_batch[key] = result
            del model, step
        except Exception as e:
            report.largest_batch[key] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        free(device)


def _with_simulated_memory_limit(step, limit: int):
    def limited(images: torch.Tensor, targets: torch.Tensor) -> None:
        if len(images) > limit:
            raise torch.cuda.OutOfMemoryError("simulated (cpu smoke)")
        step(images, targets)

    return limited


def train_check(report: Report, settings: Settings, folder: Path) -> None:
    """The real command on the digits: its per-epoch training loss must fall."""
    overrides = [f"device={settings.device.type}", "epochs=2"]
    if settings.smoke:
        overrides += ["data.limit=96", "batch_size=16", "grad_checkpointing=true", "amp=bf16"]
    command = [sys.executable, "-m", "tresfinetune", "train", str(REPO / "recipes" / "digits.yaml"),
               "-o", str(folder / "digits")] + [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_child_env())
    losses = []
    metrics = folder / "digits" / "metrics.jsonl"
    if metrics.exists():
        losses = [json.loads(line)["train_loss"] for line in metrics.read_text().splitlines() if line.strip()]
    falling = len(losses) == 2 and losses[1] < losses[0] < math.log(10)
    report.checks["train_digits"] = {
        "command": " ".join(command[1:]), "returncode": done.returncode, "train_loss": losses,
        "passed": done.returncode == 0 and falling,
        **({} if done.returncode == 0 else {"stderr": done.stderr.strip()[-400:]}),
    }


def torchrun_check(report: Report, settings: Settings, folder: Path) -> None:
    steps = 4 if settings.smoke else 40
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
               str(Path(__file__).resolve()), "--ddp-worker", "--device", settings.device.type, "--worker-steps",
               str(steps), "--worker-out", str(folder / "ddp.json")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_child_env())
    result = json.loads((folder / "ddp.json").read_text()) if (folder / "ddp.json").exists() else {}
    losses = result.get("losses", [])
    third = max(1, len(losses) // 3)
    falling = bool(losses) and sum(losses[-third:]) / third < sum(losses[:third]) / third
    report.checks["torchrun_ddp"] = {
        "backend": result.get("backend"), "returncode": done.returncode, "first_losses": losses[:third],
        "last_losses": losses[-third:], "passed": done.returncode == 0 and falling,
        **({} if done.returncode == 0 else {"stderr": done.stderr.strip()[-400:]}),
    }


def _child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def ddp_worker(args: argparse.Namespace) -> None:
    """Run under torchrun: DDP + synchronised norms + grad checkpointing + autocast on the digits, pinned loader."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    from tresfinetune.datasets.local import digits_images
    from tresfinetune.models import convert_sync_norm, create_model
    from tresfinetune.runtime import autocast, half_dtype

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        images, labels = digits_images()
        dataset = TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
        loader = DataLoader(dataset, batch_size=32, sampler=DistributedSampler(dataset, seed=0),
                            pin_memory=device.type == "cuda", drop_last=True)
        model = convert_sync_norm(create_model("tresnet_m", num_classes=10))
        model.set_grad_checkpointing(True)
        model = model.to(device).to(memory_format=torch.channels_last).train()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                        else None)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=2e-3)
        amp = half_dtype(device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        losses = []
        for images, targets in loader:
            x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                loss = torch.nn.functional.cross_entropy(ddp(x).float(), targets.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            if len(losses) == args.worker_steps:
                break
        if rank == 0:
            Path(args.worker_out).write_text(json.dumps({"backend": dist.get_backend(), "losses": losses}))
    finally:
        dist.destroy_process_group()


def markdown(report: Report) -> str:
    lines = ["| impl | model | px | amp | compile | batch | train img/s | infer img/s | train peak MiB | "
             "infer peak MiB | status |", "|" + "---|" * 11]

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:,.0f}"

    for r in report.rows:
        lines.append(f"| {r.impl} | {r.model} | {r.input_size} | {r.amp} | {'yes' if r.compile else 'no'} | "
                     f"{r.batch} | {number(r.train_img_per_s)} | {number(r.infer_img_per_s)} | "
                     f"{number(r.train_peak_mib)} | {number(r.infer_peak_mib)} | {r.status} |")
    lines.append("")
    for key, value in report.largest_batch.items():
        lines.append(f"largest training batch, tresnet_m bf16 channels_last, {key}: {value}")
    for key, value in report.checks.items():
        lines.append(f"check {key}: {'PASSED' if value.get('passed') else 'FAILED'} {json.dumps(value)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every code path at tiny sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=450.0, help="compiled rows stop when this is spent")
    parser.add_argument("--json", help="also write the JSON here")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--worker-steps", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    started = time.perf_counter()
    deadline = started + args.budget_s
    if args.cpu_smoke:
        torch.set_num_threads(1)
        settings = Settings(torch.device("cpu"), {32: 2}, 1, 0, "eager", (("tresnet_m", 32),), True)
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU here; run with --cpu-smoke to check the code paths on the CPU")
            return 2
        torch.backends.cudnn.benchmark = True
        settings = Settings(torch.device("cuda"), {224: 128, 448: 32}, 10, 2, "inductor", MODELS, False)
    import timm

    device = settings.device
    environment = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device),
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "smoke": settings.smoke, "budget_s": args.budget_s}
    report = Report(environment)
    with tempfile.TemporaryDirectory() as tmp:
        sections = [("eager rows", lambda: run_rows(report, settings, False, deadline)),
                    ("largest batch", lambda: largest_batches(report, settings)),
                    ("tresfinetune train on the digits", lambda: train_check(report, settings, Path(tmp))),
                    ("torchrun DDP worker", lambda: torchrun_check(report, settings, Path(tmp))),
                    ("compiled rows", lambda: run_rows(report, settings, True, deadline))]
        for title, section in sections:
            print(f"{title} (at {time.perf_counter() - started:.0f} s)", flush=True)
            section()
    report.environment["seconds"] = round(time.perf_counter() - started, 1)
    print(markdown(report))
    as_json = json.dumps(asdict(report), indent=2)
    print(as_json)
    if args.json:
        Path(args.json).write_text(as_json)
    failed = [r for r in report.rows if r.status.startswith("error")]
    failed += [k for k, v in report.checks.items() if not v["passed"]]
    failed += [k for k, v in report.largest_batch.items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
