"""WebDataset shards (SPEC.md section 11): the `webdataset` source and the loaders that stream it.

A shard is a tar whose samples are files sharing a basename: an image (`000123.jpg`, `.png`, ...) and its label,
`000123.cls` (the class index as text, single-label) or `000123.json` (multi-label: a list of positive classes, or
`{"labels": [...], "negatives": [...]}` where classes in neither list are unknown; classes by index or by name).
`dataset.json` beside the shards (written by `tresfinetune data pack`) names the task, the classes, the shards of
each split and their sample counts.

The streaming plan is fixed for the whole run, so every epoch has the same number of steps:
- Shards are dealt to the processes (ranks), then to each process's loader workers, largest first to the least
  loaded: every reader reads its own shards. With fewer shards than readers, readers share shards and each keeps
  every k-th sample of them (more reading, still disjoint samples).
- Each epoch, a reader visits its shards in an order drawn from (seed, epoch) and shuffles their samples in a buffer
  of data.shuffle_buffer samples seeded by (seed, epoch, rank, worker); a sample's augmentation is seeded by
  (seed, epoch, sample key), as the folder loader seeds by sample index.
- Training: every rank runs the same number of steps, that of the rank with the fewest full batches (an uneven
  split never leaves DDP waiting); the other ranks leave their surplus samples out of that epoch, different ones
  each epoch as the order changes. No sample is used twice in an epoch. A rank whose shards deliver fewer samples
  than counted (a damaged shard) reads them again to finish the epoch instead of stalling the others.
- Validation: every sample of the split once across ranks, no padding.

Resuming: an epoch's order is a function of (seed, epoch, processes, workers). At an epoch boundary the resumed run
is exact; mid-epoch the already-trained batches are read again and dropped, so it is exact too, at the cost of
decoding them (resuming with another number of processes or workers gives that epoch another order).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tresfinetune.datasets.images import IMAGE_EXTENSIONS, UnreadableImage, decode_image
from tresfinetune.datasets.loaders import BadImageLog, BadSample, ImageLoader, _worker_init
from tresfinetune.datasets.source import (
    DataSource,
    multi_hot,
    partial_target,
    register,
)
from tresfinetune.errors import UserError
from tresfinetune.tasks import MULTI_LABEL, SINGLE_LABEL

if TYPE_CHECKING:
    from tresfinetune.recipe import DataConfig, Recipe

log = logging.getLogger("tresfinetune")

METADATA_FILE = "dataset.json"
INSTALL_HINT = "pip install webdataset (or pip install 'tresfinetune[shards]')"
IMAGE_SUFFIXES = tuple(sorted(ext.lstrip(".") for ext in IMAGE_EXTENSIONS))
REMOTE_PREFIXES = ("pipe:", "http://", "https://")


def webdataset_module() -> Any:
    """The webdataset package, imported on first use (an optional dependency)."""
    try:
        import webdataset
    except ImportError:
        raise UserError(f"reading and writing shards needs the webdataset package: {INSTALL_HINT}") from None
    return webdataset


def is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES) and "://" not in url


def expand_urls(spec: str | list[str], key: str) -> list[str]:
    """Brace lists (`train-{000000..000127}.tar`) expanded; `~` expanded in local paths."""
    from braceexpand import braceexpand  # installed with webdataset

    webdataset_module()
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for text in specs for url in braceexpand(text.strip())]
    urls = [os.path.expanduser(url) if is_local(url) else url for url in urls]
    if not urls:
        raise UserError(f"recipe key 'data.{key}' lists no shards")
    for url in urls:
        if is_local(url) and not os.path.isfile(url):
            raise UserError(f"shard '{url}' (data.{key}) does not exist; check the path and the brace range")
    return urls


# ---- dataset.json and the source ----------------------------------------------------------------------------------


@dataclass
class ShardSplit:
    urls: list[str]
    counts: list[int]  # samples per shard

    @property
    def images(self) -> int:
        return sum(self.counts)


@dataclass
class ShardSource(DataSource):
    """A DataSource whose splits are streamed from shards rather than listed."""

    shard_splits: dict[str, ShardSplit] = field(default_factory=dict)
    unknown_labels: bool = False  # multi-label: whether some targets have unknown (-1) entries
    metadata: dict | None = None  # dataset.json, when there is one

    def split(self, name: str) -> list:
        raise UserError(f"the '{name}' split of webdataset shards is streamed, so this command cannot list its "
                        "images; run it on the data the shards were packed from (--set data.name=... data.root=...)")

    def build_loaders(self, recipe: Recipe, rank: int, world_size: int,
                      device: torch.device) -> tuple[ShardLoader, ShardLoader, ShardSource]:
        """Streamed splits make their own loaders (loaders.build_loaders hands them over)."""
        return build_shard_loaders(recipe, self, rank, world_size, device)

    def shard_split(self, name: str) -> ShardSplit:
        resolved = {"validation": "val", "valid": "val"}.get(name, name)
        if resolved not in self.shard_splits:
            raise UserError(f"webdataset shards have no split '{name}'; available: {', '.join(self.shard_splits)}")
        return self.shard_splits[resolved]


def _metadata_location(data_cfg: DataConfig) -> str | None:
    """Where dataset.json should be: in data.root, else beside the first training shard (not for pipe: URLs)."""
    if data_cfg.root:
        root = data_cfg.root
    elif data_cfg.train_urls:
        first = data_cfg.train_urls if isinstance(data_cfg.train_urls, str) else data_cfg.train_urls[0]
        if first.startswith("pipe:"):
            return None
        root = first.rsplit("/", 1)[0] if "/" in first else "."
    else:
        raise UserError("data.name: webdataset needs data.root (a folder holding dataset.json, as `tresfinetune data "
                        "pack` writes) or data.train_urls and data.val_urls (shard URLs)")
    if is_local(root):
        return str(Path(root).expanduser() / METADATA_FILE)
    return root.rstrip("/") + "/" + METADATA_FILE


def read_metadata(data_cfg: DataConfig) -> tuple[dict | None, str | None]:
    """(dataset.json's content or None, the folder or URL prefix it is in)."""
    location = _metadata_location(data_cfg)
    if location is None:
        return None, None
    base = location[: -len(METADATA_FILE) - 1]
    try:
        if is_local(location):
            if not os.path.isfile(location):
                if data_cfg.root and not (data_cfg.train_urls and data_cfg.val_urls):
                    raise UserError(f"'{location}' does not exist; pack data with `tresfinetune data pack RECIPE --out "
                                    "DIR` or give data.train_urls and data.val_urls")
                return None, base
            text = Path(location).read_text()
        else:
            with webdataset_module().gopen(location) as f:
                text = f.read().decode()
    except UserError:
        raise
    except Exception as e:  # a remote listing that is not there: work from the URLs and data.classes
        log.debug("no %s at %s: %s", METADATA_FILE, location, e)
        return None, base
    try:
        return json.loads(text), base
    except json.JSONDecodeError as e:
        raise UserError(f"'{location}' is not valid JSON ({e.msg} at line {e.lineno})") from None


def _shard_name_tokens(url: str) -> list[str]:
    return [token for token in re.split(r"[\s/'\"=]+", url) if token]


def _listed_counts(urls: list[str], listed: list[dict]) -> list[int | None]:
    """Each URL's sample count from dataset.json, matched by shard file name (works for paths, http and pipe:)."""
    by_name = {entry["name"]: int(entry["images"]) for entry in listed}
    counts = []
    for url in urls:
        names = [token for token in _shard_name_tokens(url) if token in by_name]
        counts.append(by_name[names[-1]] if names else None)
    return counts


def count_shard(url: str) -> int:
    """Samples in one shard, by reading its tar headers (the whole stream for remote shards)."""
    wds = webdataset_module()
    keys = set()
    try:
        for item in wds.tariterators.tar_file_expander(wds.tariterators.url_opener([{"url": url}]), eof_value=None):
            keys.add(wds.tariterators.base_plus_ext(item["fname"])[0])
    except Exception as e:  # a damaged shard: count what precedes the damage; reading it reports the rest
        log.warning("shard %s: %s", url, describe_error(e))
    return len(keys)


def describe_error(error: BaseException) -> str:
    first = str(error.args[0]) if error.args else ""
    exited = re.search(r"'shell': True.*\): exit (\d+)", first)  # webdataset's words for a failed pipe: command
    if exited:
        return f"the command exited with status {exited[1]}"
    return f"{type(error).__name__}: {first.split(' @ ')[0]}" if first else type(error).__name__


def _split_from(data_cfg: DataConfig, split: str, metadata: dict | None, base: str | None) -> ShardSplit:
    key = f"{split}_urls"
    spec = getattr(data_cfg, key)
    listed = (metadata or {}).get("splits", {}).get(split, {}).get("shards", [])
    if not spec:
        if not listed:
            raise UserError(f"webdataset needs data.{key} (e.g. 'shards/{split}-{{000000..000009}}.tar', or "
                            f"'pipe:CMD'), or a {METADATA_FILE} that lists the {split} shards")
        sep = os.sep if base is not None and is_local(base) else "/"
        spec = [f"{base}{sep}{entry['name']}" for entry in listed]
    urls = expand_urls(spec, key)
    counts = _listed_counts(urls, listed)
    missing = [url for url, count in zip(urls, counts, strict=True) if count is None]
    if missing:
        log.info("counting the samples of %d %s shard(s) by reading them (%s lists no count for them)",
                 len(missing), split, METADATA_FILE)
        found = {url: count_shard(url) for url in missing}
        counts = [found[url] if count is None else count for url, count in zip(urls, counts, strict=True)]
    return ShardSplit(urls, counts)


READ_BUFFER = 1 << 20  # bytes per read from a shard: tarfile's own reads are small, each a Python call


def shard_samples(url: str, handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """webdataset's tarfile_samples for one shard, opened with a large read buffer."""
    tariterators = webdataset_module().tariterators
    streams = tariterators.url_opener([{"url": url}], handler=handler, bufsize=READ_BUFFER)
    return tariterators.group_by_keys(tariterators.tar_file_expander(streams, handler=handler), handler=handler)


def stop_at_error(errors: list) -> Callable[[BaseException], bool]:
    """A webdataset error handler that keeps the error in `errors` and stops reading that shard."""
    def stop(error: BaseException) -> bool:
        errors.append(error)
        return False

    return stop


def _peek_task(url: str) -> str:
    """single-label if the first sample of a shard has a .cls file, multi-label if it has a .json."""
    errors: list[BaseException] = []
    for sample in shard_samples(url, stop_at_error(errors)):
        if "cls" in sample:
            return SINGLE_LABEL
        if "json" in sample:
            return MULTI_LABEL
        break
    if errors:
        raise UserError(f"cannot read shard '{url}' ({describe_error(errors[0])}); check the URL or command")
    raise UserError(f"cannot tell the task from shard '{url}': its first sample has no .cls (single-label) or .json "
                    f"(multi-label) file; pack the data with `tresfinetune data pack`")


def shard_defaults(data_cfg: DataConfig) -> dict:
    """What the default transforms need to know: the task (from dataset.json, else the first training sample) and
    the packed source's hints (no flips for digits...). The task stays None while the shards cannot be found: the
    transforms then take the single-label defaults, and building the source says what is missing."""
    try:
        metadata, _ = read_metadata(data_cfg)
        hints = dict((metadata or {}).get("augmentation", {}))
        if metadata and metadata.get("task") in (SINGLE_LABEL, MULTI_LABEL):
            return {"task": metadata["task"], **hints}
        if not data_cfg.train_urls:
            return {}
        return {"task": _peek_task(expand_urls(data_cfg.train_urls, "train_urls")[0]), **hints}
    except UserError:
        return {}


@register("webdataset", None, from_data=shard_defaults)
def build_webdataset(data_cfg: DataConfig) -> ShardSource:
    if data_cfg.download:
        raise UserError("webdataset shards cannot be downloaded by tresfinetune; set data.download: false")
    metadata, base = read_metadata(data_cfg)
    splits = {split: _split_from(data_cfg, split, metadata, base) for split in ("train", "val")}
    class_names = data_cfg.classes or (metadata or {}).get("class_names")
    if not class_names:
        raise UserError(f"webdataset needs the class names: a {METADATA_FILE} beside the shards (data.root) or "
                        "data.classes: [name, ...] in label order")
    if metadata and metadata.get("task") in (SINGLE_LABEL, MULTI_LABEL):
        task = metadata["task"]
    else:
        task = _peek_task(splits["train"].urls[0])
    # Without dataset.json nobody has looked: assume a multi-label set may have unknowns (ignoring none is harmless).
    unknown = bool(metadata["unknown_labels"]) if metadata and "unknown_labels" in metadata else task == MULTI_LABEL
    return ShardSource(task, [str(name) for name in class_names], {}, name="webdataset", shard_splits=splits,
                       unknown_labels=unknown, metadata=metadata)


# ---- labels -------------------------------------------------------------------------------------------------------


def parse_target(sample: dict, task: str, class_index: dict[str, int]) -> Any:
    """A sample's target from its .cls or .json file; ValueError saying what is wrong."""
    num_classes = len(class_index)
    if task == SINGLE_LABEL:
        if "cls" not in sample:
            raise ValueError("no .cls label file")
        text = sample["cls"].decode().strip()
        label = int(text) if text.lstrip("-").isdigit() else class_index.get(text, -1)
        if not 0 <= label < num_classes:
            raise ValueError(f"label '{text}' is not one of the {num_classes} classes")
        return label
    if "json" not in sample:
        raise ValueError("no .json label file")
    labels = json.loads(sample["json"])
    negatives = None
    if isinstance(labels, dict):
        negatives = labels.get("negatives")
        labels = labels.get("labels", [])

    def indices(items: list) -> list[int]:
        found = [class_index.get(item, -1) if isinstance(item, str) else int(item) for item in items]
        bad = [item for item, i in zip(items, found, strict=True) if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"label {bad[0]!r} is not one of the {num_classes} classes")
        return found

    if negatives is None:
        return multi_hot(indices(labels), num_classes)
    return partial_target(indices(labels), indices(negatives), num_classes)


def sample_name(sample: dict) -> str:
    url = sample.get("__url__", "")
    shard = _shard_name_tokens(url)[-1] if url else "?"
    return f"{shard}:{sample.get('__key__')}"


def image_entry(sample: dict) -> str | None:
    return next((suffix for suffix in IMAGE_SUFFIXES if suffix in sample), None)


# ---- which reader reads what ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    """What one loader worker of one rank reads: these shards, keeping every `stride`-th sample from `offset`."""

    shards: tuple[int, ...]
    stride: int = 1
    offset: int = 0

    def size(self, counts: list[int]) -> int:
        return len(range(self.offset, sum(counts[i] for i in self.shards), self.stride))


def deal(shards: list[int], counts: list[int], parts: int) -> list[list[int]]:
    """Shards into `parts` groups of near-equal sample counts: largest first, each to the least loaded group."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for shard in sorted(shards, key=lambda s: (-counts[s], s)):
        target = loads.index(min(loads))
        groups[target].append(shard)
        loads[target] += counts[shard]
    return [sorted(group) for group in groups]


def plan_readers(counts: list[int], world_size: int, workers: int) -> list[list[Reader]]:
    """[rank][worker] -> Reader. Disjoint shards wherever there are enough of them, else shared with a stride."""
    everything = list(range(len(counts)))
    per_rank = deal(everything, counts, world_size)
    if any(sum(counts[s] for s in shards) == 0 for shards in per_rank):  # too few (non-empty) shards to go round
        readers = world_size * workers
        return [[Reader(tuple(everything), readers, rank * workers + w) for w in range(workers)]
                for rank in range(world_size)]
    plan = []
    for shards in per_rank:
        if len(shards) >= workers:
            plan.append([Reader(tuple(group)) for group in deal(shards, counts, workers)])
        else:
            plan.append([Reader(tuple(shards), workers, w) for w in range(workers)])
    return plan


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Items in random order using a buffer of `size`: each arrival replaces a randomly chosen buffered item."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


# ---- the streaming dataset and loader ------------------------------------------------------------------------------


class ShardStream(IterableDataset):
    """One rank's stream of (image HWC uint8, target) from its readers' shards; BadSample for what cannot be read."""

    def __init__(self, split: ShardSplit, readers: list[Reader], transform: Callable, task: str,
                 class_names: list[str], seed: int = 0, train: bool = False, shuffle_buffer: int = 0, rank: int = 0,
                 unknown_labels: bool = False):
        self.split, self.readers, self.transform, self.task = split, readers, transform, task
        self.class_index = {name: i for i, name in enumerate(class_names)}
        self.seed, self.train, self.shuffle_buffer, self.rank = seed, train, shuffle_buffer, rank
        self.has_unknown_labels = unknown_labels
        self.epoch = 0
        self.pass_number = 0  # > 0 when a rank re-reads its shards to finish an epoch (see the module docstring)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.split.images

    def raw_samples(self, reader: Reader) -> Iterator[dict | BadSample]:
        """The reader's samples as webdataset dicts, in this epoch's shard order; a damaged shard adds a BadSample."""
        order = list(reader.shards)
        if self.train:  # the same order for every reader of the same shards, so strided readers stay disjoint
            random.Random(_seed(self.seed, self.epoch, self.pass_number)).shuffle(order)
        position = 0
        for shard in order:
            url = self.split.urls[shard]
            errors: list[BaseException] = []
            read = 0
            for sample in shard_samples(url, stop_at_error(errors)):
                if position % reader.stride == reader.offset:
                    yield sample
                position += 1
                read += 1
            if errors:
                yield BadSample(url, f"damaged shard ({describe_error(errors[0])})", "shard")
            elif read < self.split.counts[shard]:
                # Python's tarfile takes a tar cut at a header boundary for a shorter archive; the count tells.
                yield BadSample(url, f"damaged shard: it ends after {read} of its {self.split.counts[shard]} "
                                "samples (truncated?)", "shard")

    def prepare(self, sample: dict | BadSample) -> tuple[torch.Tensor, torch.Tensor] | BadSample:
        if isinstance(sample, BadSample):
            return sample
        name = sample_name(sample)
        entry = image_entry(sample)
        if entry is None:
            return BadSample(name, "no image file in the sample")
        try:
            target = parse_target(sample, self.task, self.class_index)
            pixels = decode_image(sample[entry], name, getattr(self.transform, "decode_fits", None))
        except UnreadableImage as e:
            return BadSample(e.path, e.reason)
        except (ValueError, UnicodeDecodeError) as e:
            return BadSample(name, f"bad label file: {e}")
        reseed = getattr(self.transform, "reseed", None)
        if reseed is not None:
            reseed(self.seed, self.epoch, zlib.crc32(name.encode()))
        if self.task == MULTI_LABEL:
            return self.transform(pixels), torch.as_tensor(np.asarray(target, dtype=np.float32))
        return self.transform(pixels), torch.tensor(target, dtype=torch.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | BadSample]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        reader = self.readers[worker]
        samples: Iterator = self.raw_samples(reader)
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.epoch, self.pass_number, self.rank, worker))
            samples = shuffled(samples, self.shuffle_buffer, rng)
        for sample in samples:
            yield self.prepare(sample)


class ShardLoader(ImageLoader):
    """An ImageLoader over a ShardStream. Training (`steps` set): exactly `steps` batches per epoch on every rank."""

    def __init__(self, dataset: ShardStream, steps: int | None, batches: int, **kwargs: Any):
        super().__init__(dataset, **kwargs)
        self.steps, self.batches = steps, batches

    def __len__(self) -> int:
        return self.steps if self.steps is not None else self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset.pass_number = 0
        if self.steps is None:
            yield from super().__iter__()
            return
        delivered = 0
        for attempt in itertools.count():
            self.dataset.pass_number = attempt
            before = delivered
            batches = super().__iter__()
            try:
                for batch in batches:
                    yield batch
                    delivered += 1
                    if delivered == self.steps:
                        return
            finally:
                batches.close()
            if delivered == before:
                raise UserError("the training shards delivered no readable samples; check them with "
                                "`tresfinetune data check`")
            log.warning("rank %d: the training shards gave %d of this epoch's %d batches (fewer samples than "
                        "counted); reading them again for the rest", self.dataset.rank, delivered, self.steps)


def build_shard_loaders(recipe: Recipe, source: ShardSource, rank: int = 0, world_size: int = 1,
                        device: torch.device = torch.device("cpu")) -> tuple[ShardLoader, ShardLoader, ShardSource]:
    """build_loaders for shards: the training loader runs the same number of steps on every rank."""
    from tresfinetune.datasets.transforms import build_transforms

    if recipe.data.limit is not None:
        raise UserError("data.limit does not apply to webdataset shards; list fewer shards in data.train_urls")
    if recipe.data.decode_cache:
        raise UserError("data.decode_cache does not apply to webdataset shards; pack with --max-side to decode less")
    train_split = source.shard_split(recipe.data.train_split)
    val_split = source.shard_split(recipe.data.val_split)
    for name, split in ((recipe.data.train_split, train_split), (recipe.data.val_split, val_split)):
        if split.images == 0:
            raise UserError(f"the '{name}' shards of webdataset hold no samples")
    readers_per_rank = max(1, recipe.workers)
    batch = recipe.batch_size
    train_plan = plan_readers(train_split.counts, world_size, readers_per_rank)
    sizes = [[reader.size(train_split.counts) for reader in readers] for readers in train_plan]
    steps = min(sum(n // batch for n in rank_sizes) for rank_sizes in sizes)
    drop_last = steps > 0
    if not drop_last:  # batches larger than a worker's share: keep the partial ones
        steps = min(sum(math.ceil(n / batch) for n in rank_sizes) for rank_sizes in sizes)
    if steps == 0:
        raise UserError(f"the training shards cannot give each of the {world_size} process(es) a batch; use fewer "
                        "processes or more data")
    val_plan = plan_readers(val_split.counts, world_size, readers_per_rank)
    if min(sum(reader.size(val_split.counts) for reader in readers) for readers in val_plan) == 0:
        raise UserError(f"the validation shards ({val_split.images} images in {len(val_split.urls)} shard(s)) leave "
                        f"a process with none; use fewer than {world_size} processes or more validation images")
    val_batches = sum(math.ceil(reader.size(val_split.counts) / batch) for reader in val_plan[rank])

    common = dict(task=source.task, class_names=source.class_names, seed=recipe.seed, rank=rank,
                  unknown_labels=source.unknown_labels)
    train_set = ShardStream(train_split, train_plan[rank], build_transforms(recipe, train=True), train=True,
                            shuffle_buffer=recipe.data.shuffle_buffer, **common)
    val_set = ShardStream(val_split, val_plan[rank], build_transforms(recipe, train=False), **common)
    workers = recipe.workers
    loader_options: dict[str, Any] = {
        "batch_size": batch,
        "num_workers": workers,
        "pin_memory": device.type == "cuda" and recipe.data.pin_memory,
        # Workers are started per epoch: a persistent worker's copy of the stream would not see the new epoch.
        "persistent_workers": False,
        "worker_init_fn": _worker_init if workers > 0 else None,
        "bad_images": BadImageLog(recipe.data.on_bad_image),
    }
    train_loader = ShardLoader(train_set, steps, steps, drop_last=drop_last, **loader_options)
    val_loader = ShardLoader(val_set, None, val_batches, drop_last=False, **loader_options)
    return train_loader, val_loader, source


def shard_eval_loader(recipe: Recipe, source: ShardSource, split: str, batch_size: int | None = None,
                      workers: int | None = None, device: torch.device = torch.device("cpu")) -> ShardLoader:
    """A loader over every image of one split of shards, for `evaluate` (one process; bad images are skipped)."""
    from tresfinetune.datasets.transforms import build_transforms

    shard_split = source.shard_split(split)
    if shard_split.images == 0:
        raise UserError(f"the '{split}' shards of webdataset hold no samples")
    workers = recipe.workers if workers is None else workers
    batch_size = batch_size or recipe.batch_size
    (readers,) = plan_readers(shard_split.counts, 1, max(1, workers))
    dataset = ShardStream(shard_split, readers, build_transforms(recipe, train=False), source.task,
                          source.class_names, recipe.seed)
    batches = sum(math.ceil(reader.size(shard_split.counts) / batch_size) for reader in readers)
    return ShardLoader(dataset, None, batches, batch_size=batch_size, num_workers=workers, drop_last=False,
                       pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers > 0 else None,
                       bad_images=BadImageLog("skip"))
