"""Every form a model's weights come in, resolved in one place: a finished run folder (or its
``model.safetensors``), a folder written by ``unimlip-fast export``, ``pmc-clip:PATH`` (PMC-CLIP's
released checkpoint) and ``open_clip:SPEC``. :func:`load` gives a model to embed with;
:func:`load_init_from` puts weights into a model about to train (``model.init_from``), and
:func:`tokenizer_of` names the tokenizer such a run must keep."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .export import is_export, load_export, open_clip_weights
from .inference import EmbeddingModel, TrainedModel, resolve_device
from .interop import OPEN_CLIP_PREFIX, PMC_CLIP_PREFIX, bundled_hub_tokenizer, is_foreign, load_foreign, parse_spec
from .model.pmc_clip import LoadReport, load_state, map_open_clip_key, read_pmc_clip_state, same_name
from .run_folder import RunFolder
from .weights_file import read_safetensors


def load(checkpoint: str | Path, device: str | torch.device | None = None) -> EmbeddingModel:
    """A finished run folder (or its ``model.safetensors``), a folder written by ``unimlip-fast
    export``, ``pmc-clip:PATH`` or ``open_clip:SPEC`` -> an :class:`EmbeddingModel` in eval mode on
    ``device`` (default: CUDA where there is one)."""
    dev = resolve_device(device)
    if is_foreign(checkpoint):
        return load_foreign(str(checkpoint), dev)
    path = Path(checkpoint)
    model, tokenizer, cfg = load_export(path, dev) if is_export(path) else RunFolder.of(path).load_model(dev)
    return TrainedModel(model, tokenizer, cfg, dev, path)


def load_init_from(model: nn.Module, path: str) -> LoadReport:
    """``model.init_from``: PMC-CLIP's checkpoint (a torch file in its naming, or ``pmc-clip:PATH``), a
    run of this project (its folder or ``model.safetensors``, e.g. one made with configs/pmc_clip.yaml),
    an export of one, or an open_clip model of the same architecture (``open_clip:SPEC``)."""
    path = str(path).removeprefix(PMC_CLIP_PREFIX)
    if path.startswith(OPEN_CLIP_PREFIX):
        report = load_state(model, load_foreign(path, torch.device("cpu")).model.state_dict(), map_open_clip_key)
        require_both_towers(model, report, path)
        return report
    source = Path(path)
    if is_export(source):
        return load_state(model, read_safetensors(open_clip_weights(source)), map_open_clip_key)
    if source.is_dir():
        source = RunFolder(source).weights
    if source.suffix == ".safetensors":
        return load_state(model, read_safetensors(source), same_name)
    return load_state(model, read_pmc_clip_state(source))


TOWERS = {"image tower": ("visual.",), "text tower": ("text.", "text_projection.")}


def require_both_towers(model: nn.Module, report: LoadReport, spec: str) -> None:
    """An open_clip model starts a run only where its architecture is this recipe's: every tensor of our
    image and text towers filled (the fusion and SimCLR heads, which open_clip models lack, stay as
    initialised). Else one line saying how much of each tower would have loaded."""
    loaded = set(report.loaded)
    counts, gaps = [], []
    for tower, prefixes in TOWERS.items():
        ours = [name for name in model.state_dict() if name.startswith(prefixes)]
        filled = sum(name in loaded for name in ours)
        counts.append(f"{filled} of the recipe's {len(ours)} {tower.replace(' ', '-')} tensors")
        if filled < len(ours):
            gaps.append(tower)
    if gaps:
        verb = "differ" if len(gaps) > 1 else "differs"
        example = (report.mismatched or [name for name in report.missing if name.startswith(("visual.", "text."))])[:1]
        raise ValueError(
            f"model.init_from={spec}: its architecture is not this recipe's ({' and '.join(gaps)} {verb}): "
            f"its weights fill {' and '.join(counts)}"
            + (f" (e.g. {example[0]})" if example else "")
            + "; start from an open_clip model of the recipe's shape (an export of a run of it)"
        )


def tokenizer_of(init_from: str) -> Path | None:
    """The tokenizer folder a run continued from ``init_from`` must take, so its token ids mean what the
    weights learnt: a run's, an export's (or an open_clip ``local-dir:`` export's, or the one an
    ``hf-hub:`` export carries in its repo); None for PMC-CLIP's checkpoint and hub models whose
    tokenizer the text encoder's name gives."""
    if init_from.startswith(OPEN_CLIP_PREFIX + "hf-hub:"):
        return bundled_hub_tokenizer(parse_spec(init_from))
    local_dir = OPEN_CLIP_PREFIX + "local-dir:"
    source = Path(init_from[len(local_dir) :] if init_from.startswith(local_dir) else init_from)
    if is_export(source) or (init_from.startswith(local_dir) and (source / "tokenizer_config.json").is_file()):
        return source
    if source.is_dir() or source.suffix == ".safetensors":
        return RunFolder.of(source).tokenizer
    return None
