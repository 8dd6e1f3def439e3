"""What both fine-tuning tasks share: the pretrained run, image batches, ranks, the output folder.

Fine-tuning runs under plain PyTorch DistributedDataParallel (gloo on CPU, NCCL on GPU) rather than
DeepSpeed: the models are small next to pretraining's global batch, and ZeRO buys nothing here. It
launches the same way: one process, ``torchrun`` or ``deepspeed``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.dataset import Substitutes
from ..data.decoding import DECODE_ERRORS, decode_image, decode_size, failure_reason
from ..data.records import DataError
from ..data.spec import seeded_generator
from ..data.views import eval_view_one, weak_view_one
from ..durable import write_atomic
from ..inference import EmbeddingModel
from ..model import UniMlip
from ..run_folder import RunFolder
from ..train.distributed import DistEnv


def require_pretrained(run_dir: str | Path) -> RunFolder:
    """The pretraining run fine-tuning starts from, if it finished; else :class:`RunNotFinished`."""
    return RunFolder.of(run_dir).require_finished("pretraining run")


def load_pretrained_run(run_dir: str | Path, init: str, seed: int, device: torch.device) -> tuple[UniMlip, Any, Any]:
    """(model, tokenizer, pretraining config) from a finished run folder. ``init="random"``: the same
    architecture, every weight (text tower included) drawn afresh from ``seed``."""
    model, tokenizer, cfg = require_pretrained(run_dir).load_model(device)
    if init == "random":
        from transformers import AutoModel

        torch.manual_seed(seed)
        encoder = AutoModel.from_config(model.text.encoder.config, add_pooling_layer=False)
        model = UniMlip(cfg.model, cfg.loss, encoder, tokenizer.cls_token_id, len(tokenizer)).to(device)
    for p in model.parameters():  # pretraining may have frozen text layers; fine-tuning trains all
        p.requires_grad_(True)
    return model.train(), tokenizer, cfg


def require_checkpoint(checkpoint: str | Path, uni_mlip_towers: bool = False) -> None:
    """Before minutes of reading data: a finished run, or a ``pmc-clip:`` / ``open_clip:`` spec naming
    weights that exist. ``uni_mlip_towers``: the task needs Uni-Mlip's image trunk and BERT text tower
    (VQA), which an open_clip model has not."""
    from ..interop import is_foreign, parse_spec

    if not is_foreign(checkpoint):
        require_pretrained(checkpoint)
        return
    spec = parse_spec(str(checkpoint))
    if uni_mlip_towers and spec.kind == "open_clip":
        raise ValueError(
            f"{checkpoint}: VQA fine-tuning needs Uni-Mlip's image trunk (its feature map) and a BERT "
            "text tower with its token states, which an open_clip model does not give; use a run "
            "folder or pmc-clip:PATH (open_clip models: eval retrieval, eval zeroshot, finetune classify)"
        )


def load_backbone(checkpoint: str | Path, init: str, seed: int, device: torch.device) -> EmbeddingModel:
    """What fine-tuning starts from, every parameter trainable, in train mode: a finished run
    (:func:`load_pretrained_run`) or a ``pmc-clip:`` / ``open_clip:`` spec (``init="random"``: its
    architecture with every weight drawn afresh from ``seed``)."""
    from ..inference import TrainedModel
    from ..interop import is_foreign, load_foreign

    if is_foreign(checkpoint):
        torch.manual_seed(seed)
        loaded = load_foreign(str(checkpoint), device, load_weights=init != "random")
    else:
        model, tokenizer, cfg = load_pretrained_run(checkpoint, init, seed, device)
        loaded = TrainedModel(model, tokenizer, cfg, device, checkpoint)
    loaded.describe()  # the digest of the weights fine-tuning starts from, before it changes them
    for p in loaded.model.parameters():
        p.requires_grad_(True)
    loaded.model.train()
    return loaded


def fit_image_size(visual: nn.Module, image_size: int, checkpoint: str | Path) -> None:
    """An attention-pooled ResNet takes any multiple of 32 (:func:`resize_attention_pool`); any other
    image tower (a ViT) is fine-tuned at the size it was trained at."""
    if hasattr(visual, "attnpool"):
        resize_attention_pool(visual, image_size)
        return
    size = getattr(visual, "image_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    if size is not None and int(size) != image_size:
        raise ValueError(f"{checkpoint}: its image tower takes {size} px images; set data.image_size={size}")


def resize_attention_pool(visual: nn.Module, image_size: int) -> None:
    """Adapt the attention pool's learned positions to another input size (bicubic on the grid, the
    mean token's position kept), as open_clip does for CLIP's ResNets."""
    pos = visual.attnpool.positional_embedding.data  # [1 + g*g, C]
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    new_grid = image_size // 32
    if new_grid == grid:
        return
    cells = pos[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    cells = cells.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    visual.attnpool.positional_embedding = nn.Parameter(torch.cat([pos[:1], cells]))


# ------------------------------------------------------------------------------------------ images


class ImageCache:
    """Images decoded once (short side shrunk to about 1.15x the model size, never enlarged).
    Images that fail to decode are dropped with their reason counted."""

    def __init__(self, paths: list[str], image_size: int, cache: bool = True):
        self.image_size, self.decode_size = image_size, decode_size(image_size)
        self.paths, self.failed = list(paths), {}
        self.arrays: dict[str, np.ndarray] = {}
        if cache:
            for p in dict.fromkeys(self.paths):
                try:
                    self.arrays[p] = decode_image(p, self.decode_size)
                except DECODE_ERRORS as err:
                    self.failed[p] = failure_reason(err)

    def load(self, path: str) -> np.ndarray:
        return self.arrays[path] if path in self.arrays else decode_image(path, self.decode_size)

    def view(self, path: str, train: bool, scale, generator: torch.Generator) -> torch.Tensor:
        image = self.load(path)
        if train:
            return weak_view_one(image, self.image_size, generator, scale=tuple(scale))
        return eval_view_one(image, self.image_size)


class TensorFields:
    """Per-sample fields from whole-split tensors: ``fields(i) -> {name: tensor[i]}`` (picklable)."""

    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors

    def __call__(self, i: int) -> dict:
        return {name: t[i] for name, t in self.tensors.items()}


class ViewDataset(Dataset):
    """Sample ``i`` -> ``{"image", "index", **fields(i)}``: the training view (seeded by seed, epoch,
    index) or the eval view."""

    def __init__(self, paths: list[str], cache: ImageCache, fields, train: bool, scale, seed: int = 0):
        self.paths, self.cache, self.fields = paths, cache, fields
        self.train, self.scale, self.seed, self.epoch = train, scale, seed, 0
        self.substitutes = Substitutes(len(paths), self.train_view, self.describe)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        if not self.train:  # evaluation scores every sample: a bad image is an error that names it
            try:
                image = self.cache.view(self.paths[i], False, self.scale, None)
            except DECODE_ERRORS as err:
                raise DataError(f"cannot read {self.paths[i]}: {err}") from err
            return {"image": image, "index": i, "substituted": 0, **self.fields(i)}
        # Training: an image that fails to decode (not cached) is replaced by the next good one, counted.
        j, image, _ = self.substitutes(i)
        return {"image": image, "index": j, "substituted": (j - i) % len(self.paths), **self.fields(j)}

    def train_view(self, j: int) -> torch.Tensor:
        return self.cache.view(self.paths[j], True, self.scale, seeded_generator(self.seed, self.epoch, j))

    def describe(self, j: int) -> str:
        return self.paths[j]


def epoch_batches(n: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches of one epoch: a seeded permutation cut into global batches, each split
    evenly over the ranks. The last, partial global batch is kept when every rank gets two or more
    samples of it (BatchNorm needs two), else dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batches = []
    for start in range(0, n, global_batch):
        chunk = order[start : start + global_batch]
        if len(chunk) < 2 * world_size:
            break
        batches.append(np.array_split(chunk, world_size)[rank].tolist())
    return batches


def eval_indices(n: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, n, world_size))


def make_loader(dataset: Dataset, batches: list[list[int]], num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[s : s + size] for s in range(0, len(indices), size)]


def gather_rows(index: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Rows computed on each rank for its dataset indices -> all ``n`` rows in index order, on every rank."""
    parts = [(index.cpu(), values.cpu())]
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (index.cpu(), values.cpu()))
    out = torch.empty((n, *values.shape[1:]), dtype=values.dtype)
    for idx, vals in parts:
        out[idx] = vals
    return out


def wrap_ddp(model: nn.Module, env: DistEnv) -> nn.Module:
    if env.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


# --------------------------------------------------------------------------------------- run folder


class RunLog:
    """The fine-tuning folder (:class:`~unimlip_fast.run_folder.RunFolder`): its config, metrics (one
    line per epoch), weights and results; written by rank 0 only."""

    def __init__(self, run_dir: Path, env: DistEnv):
        self.run, self.main, self.start = RunFolder(Path(run_dir)), env.is_main, time.time()
        self.run_dir = self.run.path
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.run.metrics.write_text("")

    def save_config(self, cfg) -> None:
        if self.main:
            from ..config import save_config

            save_config(cfg, self.run.config)

    def log(self, record: dict) -> None:
        if self.main:
            record = {**record, "elapsed_s": round(time.time() - self.start, 1)}
            with open(self.run.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_weights(self, model: nn.Module, path: Path) -> None:
        if not self.main:
            return
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp)), what="the weights")

    def finish(self, results: dict, json_out: Path | None) -> dict:
        results = {**results, "wall_s": round(time.time() - self.start, 1), "run_dir": str(self.run_dir)}
        if self.main:
            text = json.dumps(results, indent=2)
            self.run.results.write_text(text)
            if json_out:
                Path(json_out).parent.mkdir(parents=True, exist_ok=True)
                Path(json_out).write_text(text)
        return results
