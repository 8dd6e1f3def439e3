"""One training step traced with fake tensors: shapes and dtypes only, nothing allocated.

The recipe's model is built on the ``meta`` device, its parameters and buffers turned into fake
tensors of torch's ``FakeTensorMode``, and one step's forward and backward (the model, the five
terms through the reference ops) run under :class:`LiveBytes` (every storage an op makes, counted
until it is freed; parameters and gradients apart) and ``FlopCounterMode`` (the FLOPs
bench/bench_step.py counts: matrix products, convolutions, attention). torch's own ``MemTracker``
gives the same breakdown but walks every live tensor at each op: minutes per trace of the paper's
model, where this running count takes seconds. The CPU's kernels give the shapes; the CUDA context, cuBLAS/cuDNN
workspaces and allocator fragmentation are not in the trace (the planner's reserve covers them).
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModel, BertConfig

from ..config import Config
from ..kernels.ops import REFERENCE_OPS
from ..model.text import freeze_bottom_layers
from ..model.unimlip import SIMCLR, UniMlip
from ..objective import compute_terms, total_loss
from ..text_encoders import minilm_path

CPU = torch.device("cpu")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TextArchitecture:
    config: object  # a transformers PretrainedConfig
    source: str  # where it came from, for the output


@dataclass(frozen=True)
class StepTrace:
    phase: str
    micro_batch: int
    activations: int  # peak bytes of activations and temporaries: all live storages but weights and gradients
    peak_total: int  # peak bytes of everything live (weights, buffers, gradients, activations, temporaries)
    resident: int  # bytes live before the step: weights, buffers, the batch
    flops: int  # forward + backward of the step

    @property
    def step_peak(self) -> int:
        """The most the step holds above what was live before it (gradients included)."""
        return self.peak_total - self.resident


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive during the traced step, each counted from the op that makes it until it is freed.

    ``track_static`` names the parameters and buffers (live throughout); a parameter's gradient moves from the
    step's bytes to the gradients when it is accumulated. ``peak_step``: the largest count of everything else
    (activations and temporaries, gradients of activations included); ``peak_total``: of everything."""

    def __init__(self):
        super().__init__()
        self.live = self.static = self.gradients = 0
        self.peak_step = self.peak_total = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self._gradient_storages: weakref.WeakSet = weakref.WeakSet()

    def _add(self, tensor: torch.Tensor) -> int:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return 0
        size = storage.nbytes()
        self._seen.add(storage)
        self.live += size
        weakref.finalize(storage, self._free, size, weakref.ref(storage))
        return size

    def _free(self, size: int, _storage) -> None:
        self.live -= size

    def track_static(self, module: nn.Module) -> None:
        for tensor in [*module.parameters(), *module.buffers()]:
            self.static += self._add(tensor)
        for param in module.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(self._gradient_made)

    def _gradient_made(self, param: nn.Parameter) -> None:
        storage = param.grad.untyped_storage()
        if storage not in self._gradient_storages:
            self._gradient_storages.add(storage)
            self.gradients += storage.nbytes()
            weakref.finalize(storage, self._gradient_freed, storage.nbytes())

    def _gradient_freed(self, size: int) -> None:
        self.gradients -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        self.peak_total = max(self.peak_total, self.live)
        self.peak_step = max(self.peak_step, self.live - self.static - self.gradients)
        return out


def text_architecture(cfg: Config) -> TextArchitecture:
    """The text encoder's config without downloading: random-bert from the recipe, minilm and local folders from
    their config.json, a hub id from the local cache or else BERT-base's (PubMedBERT is BERT-base)."""
    text = cfg.model.text
    if text.encoder == "random-bert":
        config = BertConfig(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            num_hidden_layers=text.num_layers,
            num_attention_heads=text.num_heads,
            intermediate_size=4 * text.hidden_size,
            max_position_embeddings=max(text.context_length, 64),
        )
        return TextArchitecture(config, f"random-bert from the recipe (vocabulary at most {text.vocab_size})")
    if text.encoder == "minilm":
        return TextArchitecture(AutoConfig.from_pretrained(str(minilm_path())), "all-MiniLM-L6-v2's config.json")
    try:
        config = AutoConfig.from_pretrained(text.encoder, local_files_only=True)
        return TextArchitecture(config, f"{text.encoder}'s config.json (found offline)")
    except (OSError, ValueError):
        return TextArchitecture(
            BertConfig(),
            f"{text.encoder} is not on this machine: BERT-base's architecture "
            "(12 x 768, vocabulary 30522) assumed offline",
        )


def planned_model(cfg: Config, text: TextArchitecture, precision: str, device: str = "meta") -> UniMlip:
    """The recipe's model on ``device`` (in bf16/fp16 for DeepSpeed's half modes, else fp32); random weights."""
    with torch.device(device):
        encoder = AutoModel.from_config(text.config, add_pooling_layer=False)
        freeze_bottom_layers(encoder, cfg.model.text.freeze_layers)
        model = UniMlip(cfg.model, cfg.loss, encoder, cls_token_id=0, vocab_size=text.config.vocab_size)
    return (model.to(HALF[precision]) if precision in HALF else model).train()


def fake_model(cfg: Config, text: TextArchitecture, precision: str, mode: FakeTensorMode) -> UniMlip:
    """The planned model with fake parameters and buffers."""
    model = planned_model(cfg, text, precision)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                module._parameters[name] = nn.Parameter(to_fake(param, mode), requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = to_fake(buffer, mode)
    return model


def to_fake(tensor: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    return mode.fake_tensor_converter.from_meta_and_device(mode, tensor, CPU)


def shaped_batch(
    cfg: Config, micro_batch: int, phase: str, dtype: torch.dtype, vocab_size: int, context_length: int | None = None
) -> dict[str, torch.Tensor]:
    """A random batch in the loader's contract (fake under a fake mode: nothing allocated)."""
    size, length = cfg.model.image_size, context_length or cfg.model.text.context_length
    views = ("image", "image_a", "image_b") if phase == SIMCLR else ("image",)
    batch = {k: torch.randn(micro_batch, 3, size, size, dtype=dtype) for k in views}
    batch["input_ids"] = torch.randint(0, vocab_size, (micro_batch, length))
    batch["attention_mask"] = torch.ones(micro_batch, length, dtype=torch.long)
    if cfg.loss.mlm > 0:
        batch["mlm_labels"] = torch.randint(0, vocab_size, (micro_batch, length))
    return batch


def run_step(model: nn.Module, batch: dict[str, torch.Tensor], cfg: Config, phase: str) -> None:
    """The step the trace measures (and bench/bench_plan.py runs for real): forward, five terms, backward."""
    loss = total_loss(compute_terms(model(batch, phase), cfg.loss, REFERENCE_OPS), cfg.loss)
    loss.backward()


def trace_step(
    cfg: Config, text: TextArchitecture, precision: str, micro_batch: int, phase: str, context_length: int | None = None
) -> StepTrace:
    """Peak memory by kind and FLOPs of one step at ``micro_batch`` per GPU, with fake tensors."""
    mode = FakeTensorMode()
    model = fake_model(cfg, text, precision, mode)
    autocast = precision.removeprefix("autocast-") if precision.startswith("autocast-") else None
    with mode:
        batch = shaped_batch(
            cfg, micro_batch, phase, HALF.get(precision, torch.float32), text.config.vocab_size, context_length
        )
        tracker = LiveBytes()
        tracker.track_static(model)
        tracker.live += sum(t.untyped_storage().nbytes() for t in batch.values())  # the batch, live throughout
        resident = tracker.live
        amp = torch.autocast("cpu", dtype=HALF[autocast]) if autocast else nullcontext()
        with FlopCounterMode(display=False) as flops, tracker, amp:
            run_step(model, batch, cfg, phase)
    return StepTrace(phase, micro_batch, tracker.peak_step, tracker.peak_total, resident, int(flops.get_total_flops()))


def parameter_counts(cfg: Config, text: TextArchitecture) -> dict[str, tuple[int, int]]:
    """(trainable, frozen) parameters per tower: visual, text, fusion, heads (projections, SimCLR, logit scale)."""
    model = planned_model(cfg, text, "fp32")
    counts: dict[str, list[int]] = {"visual": [0, 0], "text": [0, 0], "fusion": [0, 0], "heads": [0, 0]}
    for name, param in model.named_parameters():
        tower = name.split(".")[0]
        tower = tower if tower in counts else "heads"
        counts[tower][0 if param.requires_grad else 1] += param.numel()
    return {k: (v[0], v[1]) for k, v in counts.items()}
