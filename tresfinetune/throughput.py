"""Training and inference speed and peak memory of a model, measured the way the TResNet paper did.

    result = benchmark("tresnet_m", input_size=224, batch_size="auto", amp=True, device="cuda")

The paper's table (SPEC.md section 5) gives img/s for a training step (forward, backward, optimizer step) and
for inference, at 90% of the largest training batch that fits in memory. batch_size="auto" finds that batch: on
CUDA by doubling until out-of-memory, then a binary search between the last batch that fitted and the first
that did not. On the CPU there is no out-of-memory error to search with (the machine swaps or the process is
killed), so the largest batch is estimated from the memory two small training steps take, bounded by half the
available RAM and capped at CPU_MAX_BATCH (larger CPU batches do not raise throughput).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from rich.table import Table
from torch import nn

from tresfinetune.errors import UserError
from tresfinetune.runtime import autocast, half_dtype

AUTO_FRACTION = 0.9  # measure at this fraction of the largest batch, as the paper did
CPU_MAX_BATCH = 64
CPU_MEMORY_SHARE = 0.5  # of the available RAM the estimated largest CPU batch may use
CUDA_SEARCH_LIMIT = 4096
MIB = 2**20


@dataclass
class BenchmarkResult:
    model: str
    input_size: int
    device: str
    batch_size: int
    max_batch_size: int | None  # the largest training batch found (batch_size="auto" only)
    amp: str | None  # autocast dtype, e.g. "bfloat16"
    channels_last: bool
    compile: bool
    grad_checkpointing: bool
    fused: bool  # inference measured on the fused model (training always runs the trainable model)
    train_img_per_s: float | None
    infer_img_per_s: float
    train_peak_memory_mib: float | None  # CUDA: max_memory_allocated; CPU: peak RSS growth; None: unknown
    infer_peak_memory_mib: float | None
    memory_measure: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ---- memory -------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process to its current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _peak_rss_bytes() is not None
    except OSError:
        return False


def proc_bytes(path: str, key: str) -> int | None:
    """A `Key:  N kB` line of a /proc file (status, meminfo) in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_bytes() -> int | None:
    return proc_bytes("/proc/self/status", "VmHWM")


def available_memory_bytes() -> int | None:
    return proc_bytes("/proc/meminfo", "MemAvailable")


class PeakMemory:
    """Peak memory over a `with` block: CUDA allocations on a GPU; on the CPU, RSS growth: the kernel's own peak
    (VmHWM, reset at the start through /proc/self/clear_refs) where Linux allows it, else RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _rss_bytes()
        self._kernel_peak = reset_peak_rss()
        if self._start is not None and not self._kernel_peak:
            self._highest = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            rss = _rss_bytes()
            if rss is not None and rss > self._highest:
                self._highest = rss

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._start is not None and self._kernel_peak:
            self.peak_bytes = max(0, (_peak_rss_bytes() or 0) - self._start)
        elif self._start is not None:
            self._stop.set()
            self._thread.join()
            self._highest = max(self._highest, _rss_bytes() or 0)
            self.peak_bytes = self._highest - self._start

    @property
    def mib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / MIB


# ---- the measured steps -------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_batch(batch_size: int, input_size: int, num_classes: int, device: torch.device,
                  channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(batch_size, 3, input_size, input_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, torch.randint(0, num_classes, (batch_size,), device=device)


def make_train_step(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> Callable:
    """One SGD step (forward, cross-entropy, backward, update) as a function of (images, targets)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast(device, amp_dtype):
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def make_infer_step(model: nn.Module, device: torch.device, amp_dtype: torch.dtype | None) -> Callable:
    def step(images: torch.Tensor, _targets: torch.Tensor) -> None:
        with torch.inference_mode(), autocast(device, amp_dtype):
            model(images)

    return step


def time_steps(step: Callable, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, warmup: int,
               steps: int) -> float:
    """Images per second over `steps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        step(*batch)
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    _synchronize(device)
    return steps * len(batch[0]) / (time.perf_counter() - start)


# ---- the largest batch --------------------------------------------------------------------------------------------


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# What cuBLAS and cuDNN say when they cannot get their workspace: out of memory too, under another name.
LIBRARY_OUT_OF_MEMORY = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
                         "CUDNN_STATUS_MAPPING_ERROR", "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA's out-of-memory error and for the allocation failures cuBLAS/cuDNN report as RuntimeError."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(marker in str(error) for marker in LIBRARY_OUT_OF_MEMORY)


def _fits(step: Callable, batch_size: int, input_size: int, num_classes: int, device: torch.device,
          channels_last: bool) -> bool:
    try:
        step(*_random_batch(batch_size, input_size, num_classes, device, channels_last))
        _synchronize(device)
        return True
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if is_out_of_memory(e):
            return False
        raise
    finally:
        if device.type == "cuda":
            _free_cuda()


def largest_cuda_batch(step: Callable, input_size: int, num_classes: int, device: torch.device,
                       channels_last: bool, start: int = 2) -> int:
    """The largest training batch that runs without CUDA out-of-memory: doubling, then binary search."""
    if not _fits(step, start, input_size, num_classes, device, channels_last):
        raise UserError(f"even a batch of {start} images at {input_size}px does not fit in GPU memory; use a "
                        "smaller --input-size or --amp")
    good, bad = start, None
    while good < CUDA_SEARCH_LIMIT:
        if _fits(step, good * 2, input_size, num_classes, device, channels_last):
            good *= 2
        else:
            bad = good * 2
            break
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if _fits(step, middle, input_size, num_classes, device, channels_last):
            good = middle
        else:
            bad = middle
    return good


def saved_activation_bytes(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> int:
    """Bytes of the tensors a training forward pass keeps for backward (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast(images.device, amp_dtype):
        model(images)
    return sum(storages.values())


def recomputed_segment_bytes(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> int:
    """With grad checkpointing: the most any one body segment saves when backward recomputes it."""
    from tresfinetune.models.checkpointing import body_segments

    largest, x = 0, images
    for modules in body_segments(model.body):
        segment = nn.Sequential(*modules)
        largest = max(largest, saved_activation_bytes(segment, x, amp_dtype))
        with torch.no_grad(), autocast(x.device, amp_dtype):
            x = segment(x)
    return largest


def _training_bytes(model: nn.Module, images: torch.Tensor, amp_dtype: torch.dtype | None) -> int:
    """What a training forward holds for backward; checkpointed, the segment inputs plus one recomputation."""
    held = saved_activation_bytes(model.train(), images, amp_dtype)
    if getattr(model, "grad_checkpointing", False):
        held += recomputed_segment_bytes(model, images, amp_dtype)
    return held


def activation_bytes_per_image(model: nn.Module, input_size: int, device: torch.device,
                               amp_dtype: torch.dtype | None) -> float:
    """What a training forward holds for backward, per image of the batch."""
    # Two batch sizes: the difference leaves out what does not grow with the batch (weights, their autocast copies).
    saved = {size: _training_bytes(model, torch.rand(size, 3, input_size, input_size, device=device), amp_dtype)
             for size in (2, 4)}
    return max((saved[4] - saved[2]) / 2, 1.0)


def estimated_cpu_batch(model: nn.Module, input_size: int, device: torch.device,
                        amp_dtype: torch.dtype | None) -> tuple[int, str]:
    """(largest CPU batch, how it was found) from the activation memory of one image and the available RAM."""
    per_image = activation_bytes_per_image(model, input_size, device, amp_dtype)
    # Weights, gradients and SGD momentum: three float32 copies of the parameters.
    fixed = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
    available = available_memory_bytes()
    if available is None:
        return CPU_MAX_BATCH, f"CPU: free memory cannot be read here, so auto uses the cap of {CPU_MAX_BATCH}"
    fits = int((available * CPU_MEMORY_SHARE - fixed) / per_image)
    estimate = (f"~{per_image / MIB:.1f} MiB of activations per training image and {available / 2**30:.1f} GiB "
                "available")
    if fits >= CPU_MAX_BATCH:
        return CPU_MAX_BATCH, f"CPU: auto capped the largest batch at {CPU_MAX_BATCH} ({estimate} would allow {fits})"
    if fits < 2:
        raise UserError(f"a training batch of 2 at {input_size}px would not fit in this machine's memory ({estimate});"
                        " use a smaller --input-size")
    return fits, f"CPU: largest batch {fits} estimated from {estimate} (half of it used)"


# ---- the benchmark ------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device must be cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


@contextlib.contextmanager
def _cudnn_autotuner() -> Iterator[None]:
    """cuDNN's autotuner on for the block (it picks the fastest convolution algorithms, as training does)."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _first_step(step: Callable, batch: tuple[torch.Tensor, torch.Tensor], compiled: bool) -> None:
    """Run the untimed first step; a torch.compile failure (no C++ compiler, unsupported op) becomes a UserError."""
    if not compiled:
        step(*batch)
        return
    try:
        step(*batch)
    except Exception as e:  # torch's compile errors have no common base class
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UserError(f"torch.compile failed on this machine ({reason}); run without --compile") from None


def benchmark(
    model_name: str,
    input_size: int = 224,
    batch_size: int | str = 32,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    grad_checkpointing: bool = False,
    device: str = "cpu",
    fused: bool = False,
    warmup: int = 2,
    steps: int = 10,
    num_classes: int = 1000,
    train: bool = True,
    threads: int | None = None,
) -> BenchmarkResult:
    """Training and inference img/s and peak memory of a randomly initialised model on random images.

    batch_size: a number, or "auto" (90% of the largest training batch, see the module docstring). fused:
    measure inference on fuse_for_inference(model). train=False skips the training measurement.
    grad_checkpointing: training (and the largest-batch search) recomputes activations in backward.
    """
    from tresfinetune.models import create_model, fuse_for_inference

    _check_arguments(input_size, batch_size, warmup, steps)
    torch_device = _device(device)
    amp_dtype = half_dtype(torch_device) if amp else None
    notes: list[str] = []

    def build() -> nn.Module:
        model = create_model(model_name, num_classes=num_classes).to(torch_device)
        model.set_grad_checkpointing(grad_checkpointing)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    with _threads(threads), _cudnn_autotuner():
        model = build()
        max_batch = None
        if batch_size == "auto":
            # Searched on the eager model: torch.compile would recompile for every batch size tried.
            max_batch, how = _largest_batch(model, input_size, num_classes, torch_device, amp_dtype, channels_last)
            notes.append(how)
            if torch_device.type == "cuda":  # a fresh model: no gradients or optimizer state from the search
                model = build()
                _free_cuda()
            batch_size = max(2, int(max_batch * AUTO_FRACTION))
        batch = _random_batch(batch_size, input_size, num_classes, torch_device, channels_last)

        # Inference first: on the CPU, memory freed by training would be reused and hide inference's own peak.
        # Each peak includes the phase's first, untimed step, which allocates what the phase keeps.
        inference_model = fuse_for_inference(model) if fused else model.eval()
        if compile:
            inference_model = torch.compile(inference_model)
        step = make_infer_step(inference_model.eval(), torch_device, amp_dtype)
        infer_speed, infer_memory = _measured_phase(step, batch, torch_device, compile, warmup, steps)
        del step, inference_model

        train_speed = train_memory = None
        if train:
            trainable = torch.compile(model) if compile else model
            step = make_train_step(trainable.train(), torch_device, amp_dtype)
            train_speed, memory = _measured_phase(step, batch, torch_device, compile, warmup, steps)
            train_memory = memory.mib

    memory_measure = ("torch.cuda.max_memory_allocated" if torch_device.type == "cuda"
                      else "peak RSS growth over each phase" if infer_memory.peak_bytes is not None else "n/a")
    return BenchmarkResult(
        model=model_name, input_size=input_size, device=str(torch_device), batch_size=int(batch_size),
        max_batch_size=max_batch, amp=None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
        channels_last=channels_last, compile=compile, grad_checkpointing=grad_checkpointing, fused=fused,
        train_img_per_s=train_speed, infer_img_per_s=infer_speed,
        train_peak_memory_mib=train_memory, infer_peak_memory_mib=infer_memory.mib,
        memory_measure=memory_measure, notes=notes,
    )


def _check_arguments(input_size: int, batch_size: int | str, warmup: int, steps: int) -> None:
    if input_size < 32 or input_size % 16:
        raise UserError(f"--input-size must be a multiple of 16 from 32 up (e.g. 224), got {input_size}")
    if isinstance(batch_size, str) and batch_size != "auto":
        raise UserError(f"--batch-size must be a number or 'auto', got {batch_size!r}")
    if not isinstance(batch_size, str) and batch_size < 2:
        raise UserError(f"--batch-size must be at least 2 (training normalises over the batch), got {batch_size}")
    if warmup < 0 or steps < 1:
        raise UserError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")


def _largest_batch(model: nn.Module, input_size: int, num_classes: int, device: torch.device,
                   amp_dtype: torch.dtype | None, channels_last: bool) -> tuple[int, str]:
    """(largest training batch, how it was found): searched on a GPU, estimated on the CPU."""
    if device.type != "cuda":
        return estimated_cpu_batch(model, input_size, device, amp_dtype)
    search_step = make_train_step(model.train(), device, amp_dtype)
    largest = largest_cuda_batch(search_step, input_size, num_classes, device, channels_last)
    return largest, f"largest training batch that fits: {largest}"


def _measured_phase(step: Callable, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, compiled: bool,
                    warmup: int, steps: int) -> tuple[float, PeakMemory]:
    """(img/s, peak memory) of a phase; the peak includes its first, untimed step, which allocates what the phase
    keeps (gradients, optimizer state, compilation)."""
    with PeakMemory(device) as memory:
        _first_step(step, batch, compiled)
        speed = time_steps(step, batch, device, warmup, steps)
    return speed, memory


def _number(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def benchmark_table(results: list[BenchmarkResult]) -> Table:
    """Rows shaped like the paper's speed table (SPEC.md section 5), plus batch and memory columns."""
    first = results[0]
    settings = [f"{first.device}", f"{first.input_size}px", f"amp {first.amp or 'off'}"]
    settings += [name for name, on in (("channels_last", first.channels_last), ("compile", first.compile),
                                       ("fused inference", first.fused)) if on]
    table = Table(title=f"Speed ({', '.join(settings)})", title_justify="left")
    for column in ("model", "train img/s", "infer img/s", "max train batch", "batch used", "train peak MiB",
                   "infer peak MiB"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        label = r.model + (" + grad checkpointing" if r.grad_checkpointing else "")
        table.add_row(label, _number(r.train_img_per_s, 1), _number(r.infer_img_per_s, 1),
                      "-" if r.max_batch_size is None else str(r.max_batch_size), str(r.batch_size),
                      _number(r.train_peak_memory_mib), _number(r.infer_peak_memory_mib))
    notes = [note for r in results for note in r.notes]
    table.caption = "; ".join([f"memory: {first.memory_measure}", *notes])
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def benchmark_checkpointing(model_name: str, **options) -> tuple[list[BenchmarkResult], dict[str, float | None]]:
    """The model measured without and with grad checkpointing, and the trade: checkpointed / plain ratios.

    On a GPU the ratio of peak memory is max_memory_allocated's. On the CPU two runs in one process cannot be
    compared by RSS growth (the second reuses what the first freed), so the CPU trade compares the activation memory
    a training step holds per image instead: saved tensors, plus one recomputed segment when checkpointed.
    """
    plain = benchmark(model_name, grad_checkpointing=False, **options)
    checkpointed = benchmark(model_name, grad_checkpointing=True, **options)
    trade = {"train_peak_memory": _ratio(checkpointed.train_peak_memory_mib, plain.train_peak_memory_mib),
             "activation_memory": None,
             "train_img_per_s": _ratio(checkpointed.train_img_per_s, plain.train_img_per_s),
             "max_batch_size": _ratio(checkpointed.max_batch_size, plain.max_batch_size)}
    if plain.device == "cpu" and plain.train_img_per_s is not None:
        from tresfinetune.models import create_model

        held = {}
        with _threads(options.get("threads")):
            amp_dtype = torch.bfloat16 if plain.amp else None
            for checkpointing in (False, True):
                model = create_model(model_name, num_classes=options.get("num_classes", 1000))
                model.set_grad_checkpointing(checkpointing)
                held[checkpointing] = activation_bytes_per_image(model, plain.input_size, torch.device("cpu"),
                                                                 amp_dtype)
        trade.update(train_peak_memory=None, activation_memory=_ratio(held[True], held[False]))
        checkpointed.train_peak_memory_mib = checkpointed.infer_peak_memory_mib = None
        checkpointed.notes.append("CPU: the second run's RSS growth would hide what it reuses of the first's freed "
                                  "memory, so its peaks are left out; the trade compares activations per image")
    return [plain, checkpointed], trade


def describe_trade(trade: dict[str, float | None]) -> str:
    labels = {"train_peak_memory": "training peak memory", "activation_memory": "activations per image",
              "train_img_per_s": "training img/s", "max_batch_size": "largest batch"}
    parts = [f"{label} {trade[key]:.2f}x" for key, label in labels.items() if trade.get(key) is not None]
    return "grad checkpointing: " + (", ".join(parts) if parts else "no comparable numbers") + " of the plain model's"


def parse_batch_size(text: str | int) -> int | str:
    """A --batch-size value: 'auto' or a whole number."""
    if isinstance(text, int) or str(text).strip().lower() == "auto":
        return text if isinstance(text, int) else "auto"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--batch-size must be a whole number or 'auto', got {text!r}") from None
