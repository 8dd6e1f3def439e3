"""Other people's models behind the interface of a trained run (:class:`~.inference.EmbeddingModel`), so
that every protocol of this project can be pointed at the published baselines.

A checkpoint spec names, besides a run folder or an export:

- ``pmc-clip:PATH`` (or ``pmc-clip:PATH:TEXT``): PMC-CLIP's released ``checkpoint.pt`` (its state dict
  under ``state_dict``, names under ``module.``, mapped as ``model.init_from`` maps them:
  :mod:`.model.pmc_clip`). The image tower's shape is read from the weights; the text tower is
  PMC-CLIP's PubMedBERT (configs/pmc_clip.yaml), or ``TEXT``, a hub name or a folder holding the
  encoder's ``config.json`` and tokenizer. Its preprocessing is PMC-CLIP's evaluation transform
  (short side resized bicubic, centre crop, OpenAI CLIP's mean and std). It is a Uni-Mlip model in
  every respect, so VQA fine-tuning and ``model.init_from`` take it too.
- ``open_clip:hf-hub:ORG/NAME``, ``open_clip:local-dir:DIR`` or ``open_clip:MODEL_NAME:WEIGHTS``
  (``WEIGHTS`` a file, or one of open_clip's pretrained tags): any open_clip model with open_clip's own
  preprocessing and tokenizer. In a ``local-dir`` folder a text tower named by a relative path
  (``hf_model_name: "."``, as an export with a bundled text tower writes it) is resolved against
  the folder, not the working directory.

Weights come from the user's own download (or the Hugging Face cache); nothing here fetches
anything unless a hub model it needs is not cached (an ``hf-hub:`` spec, PMC-CLIP's PubMedBERT
config and tokenizer, the text tower a hub open_clip model names).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.decoding import open_rgb
from .data.views import CLIP_MEAN, CLIP_STD
from .export import OPEN_CLIP_CONFIG
from .inference import EmbeddingModel, TrainedModel

PMC_CLIP_PREFIX, OPEN_CLIP_PREFIX = "pmc-clip:", "open_clip:"
PMC_CLIP_RECIPE = "pmc_clip.yaml"  # PMC-CLIP's architecture and text tower
PMC_CLIP_CONTEXT_LENGTH = 77
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def is_foreign(checkpoint: str | Path) -> bool:
    """A ``pmc-clip:`` or ``open_clip:`` spec rather than a run folder or an export."""
    return str(checkpoint).startswith((PMC_CLIP_PREFIX, OPEN_CLIP_PREFIX))


@dataclass(frozen=True)
class ForeignSpec:
    """A parsed spec: ``kind`` pmc-clip or open_clip; ``path`` the weights file or folder where
    there is one; ``name`` open_clip's model name (``hf-hub:...``, ``local-dir:...``, ``RN50``);
    ``weights`` open_clip's pretrained file or tag; ``text`` PMC-CLIP's text tower."""

    given: str
    kind: str
    path: Path | None = None
    name: str = ""
    weights: str = ""
    text: str = ""


def parse_spec(spec: str) -> ForeignSpec:
    """``pmc-clip:PATH[:TEXT]`` / ``open_clip:SPEC`` -> :class:`ForeignSpec`; a missing file or folder
    is a clear error here, before any data is read."""
    spec = str(spec)
    if spec.startswith(PMC_CLIP_PREFIX):
        rest = spec[len(PMC_CLIP_PREFIX) :]
        path, text = rest, ""
        if not Path(rest).expanduser().is_file() and ":" in rest:
            path, text = rest.rsplit(":", 1)
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no PMC-CLIP checkpoint file at {path}")
        return ForeignSpec(spec, "pmc-clip", path=path, text=text)
    if not spec.startswith(OPEN_CLIP_PREFIX):
        raise ValueError(f"{spec!r} is not a pmc-clip: or open_clip: spec")
    rest = spec[len(OPEN_CLIP_PREFIX) :]
    if rest.startswith("hf-hub:"):
        if not re.fullmatch(r"hf-hub:[\w.-]+/[\w.-]+(@[\w.-]+)?", rest):
            raise ValueError(f"{spec}: expected open_clip:hf-hub:ORG/NAME")
        return ForeignSpec(spec, "open_clip", name=rest)
    if rest.startswith("local-dir:"):
        folder = Path(rest[len("local-dir:") :]).expanduser()
        if not (folder / OPEN_CLIP_CONFIG).is_file():
            raise FileNotFoundError(f"{spec}: {folder} holds no open_clip_config.json (not an open_clip folder)")
        return ForeignSpec(spec, "open_clip", path=folder, name=f"local-dir:{folder}")
    name, sep, weights = rest.partition(":")
    if not name or not sep or not weights:
        raise ValueError(
            f"{spec}: expected open_clip:hf-hub:ORG/NAME, open_clip:local-dir:DIR or "
            "open_clip:MODEL_NAME:WEIGHTS (a file, or an open_clip pretrained tag)"
        )
    path = Path(weights).expanduser()
    looks_like_file = weights.endswith(WEIGHT_SUFFIXES) or "/" in weights
    if looks_like_file and not path.is_file():
        raise FileNotFoundError(f"{spec}: no weights file at {path}")
    return ForeignSpec(
        spec,
        "open_clip",
        path=path if path.is_file() else None,
        name=name,
        weights=str(path) if path.is_file() else weights,
    )


def load_foreign(spec: str, device: torch.device, load_weights: bool = True) -> EmbeddingModel:
    """The model a ``pmc-clip:`` / ``open_clip:`` spec names, in eval mode on ``device``;
    ``load_weights=False``: the same architecture at random (fine-tuning's ``train.init=random``)."""
    parsed = parse_spec(spec)
    if parsed.kind == "pmc-clip":
        return load_pmc_clip_model(parsed, device, load_weights)
    return load_open_clip_model(parsed, device, load_weights)


# -------------------------------------------------------------------------------------------- PMC-CLIP


class ClipEvalTransform:
    """CLIP's (and PMC-CLIP's) evaluation transform without torchvision: the short side resized to
    ``size`` (bicubic, the long side rounded down as torchvision does), a centre crop, RGB in [0, 1]
    normalised with ``mean`` and ``std``. On a PIL image it computes what torchvision's
    ``Resize(size, BICUBIC), CenterCrop(size), ToTensor(), Normalize(mean, std)`` does."""

    def __init__(self, size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, image) -> torch.Tensor:
        im = open_rgb(image)
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.size:
            new_short, new_long = self.size, int(self.size * long / short)
            im = im.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
        w, h = im.size
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        im = im.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (pixels - self.mean) / self.std


def pmc_clip_overrides(state: dict[str, torch.Tensor]) -> list[str]:
    """Config overrides for the architecture a PMC-CLIP-named state dict holds: the image tower's
    layers, width, embedding and input size, and the fusion depth."""
    names = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        positions = names["visual.attnpool.positional_embedding"].shape[0]
        embed = names["visual.attnpool.c_proj.weight"].shape[0]
        width = names["visual.conv3.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a PMC-CLIP checkpoint: no {e.args[0]} (its ResNet image tower)") from e
    layers = [
        len({m.group(1) for k in names if (m := re.match(rf"visual\.layer{i}\.(\d+)\.", k))}) for i in range(1, 5)
    ]
    fusion = len({m.group(1) for k in names if (m := re.match(r"fusion_module\.resblocks\.(\d+)\.", k))})
    grid = round((positions - 1) ** 0.5)
    return [
        f"model.vision_layers=[{','.join(map(str, layers))}]",
        f"model.vision_width={width}",
        f"model.embed_dim={embed}",
        f"model.image_size={grid * 32}",
        f"model.fusion_layers={max(fusion, 1)}",
        f"model.text.context_length={PMC_CLIP_CONTEXT_LENGTH}",
        "model.text.freeze_layers=0",
    ]


def load_pmc_clip_model(spec: ForeignSpec, device: torch.device, load_weights: bool = True) -> TrainedModel:
    """PMC-CLIP's checkpoint as a Uni-Mlip model of its shape; its image and text towers must load whole."""
    from .config import load_config, shipped_config
    from .model import build_model, build_tokenizer
    from .model.pmc_clip import load_state, read_pmc_clip_state

    state = read_pmc_clip_state(spec.path)
    overrides = pmc_clip_overrides(state)
    if spec.text:
        overrides.append(f"model.text.encoder={spec.text}")
    cfg = load_config(shipped_config(PMC_CLIP_RECIPE), overrides)
    tokenizer = build_tokenizer(cfg.model.text)
    model = build_model(cfg.model, cfg.loss, tokenizer, pretrained_text=False)
    if load_weights:
        report = load_state(model, state)
        towers = ("visual.", "text.", "text_projection.", "logit_scale")
        lost = [k for k in report.missing if k.startswith(towers)] + report.mismatched
        if lost:
            raise ValueError(
                f"{spec.given}: the checkpoint does not fill the image and text towers of "
                f"{cfg.model.text.encoder} ({len(lost)} tensors, e.g. {lost[:3]}); is TEXT the text "
                "tower it was trained with?"
            )
    return TrainedModel(
        model.to(device),
        tokenizer,
        cfg,
        device,
        spec.given,
        preprocess=ClipEvalTransform(cfg.model.image_size),
        native=False,
    )


# ------------------------------------------------------------------------------------------- open_clip


def import_open_clip():
    try:
        import open_clip
    except ImportError as e:
        raise RuntimeError(
            "open_clip: checkpoints need open-clip-torch and torchvision "
            "(pip install open-clip-torch, or the dev extra)"
        ) from e
    return open_clip


def bundled_text_cfg(folder: Path) -> dict | None:
    """A local-dir folder's ``text_cfg`` with a relative ``hf_model_name`` resolved against the folder
    (open_clip itself resolves it against the working directory); None when there is nothing to resolve."""
    text_cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model_cfg"].get("text_cfg", {})
    name = text_cfg.get("hf_model_name")
    if not name or Path(name).is_absolute() or not (folder / name / "config.json").is_file():
        return None
    return {**text_cfg, "hf_model_name": str((folder / name).resolve()), "hf_model_pretrained": False}


TOKENIZER_FILES = ["tokenizer*.json", "special_tokens_map.json", "vocab.*", "merges.txt", "*.model", "config.json"]


def bundled_hub_tokenizer(spec: ForeignSpec) -> Path | None:
    """The folder (in the Hugging Face cache) of the tokenizer an ``hf-hub:`` model carries in its own repo,
    as an export uploaded with ``--hub-id`` does (its ``hf_tokenizer_name`` is the repo); None where the
    model names another tokenizer (a hub text encoder's own, which that name gives)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, _, revision = spec.name.removeprefix("hf-hub:").partition("@")
    try:
        config = json.loads(Path(hf_hub_download(repo_id, OPEN_CLIP_CONFIG, revision=revision or None)).read_text())
        tokenizer = config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name")
        if tokenizer != repo_id:
            return None
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=TOKENIZER_FILES))
    except (OSError, ValueError, KeyError) as e:  # huggingface_hub's errors are OSErrors or ValueErrors
        raise RuntimeError(f"{spec.given}: could not read its open_clip config or tokenizer: {e}") from e


class OpenClipModel(EmbeddingModel):
    """An open_clip model with its own evaluation transform and tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, transform, device: torch.device, spec: str):
        self.model, self.tokenizer, self.transform = model.to(device).eval(), tokenizer, transform
        self.device, self.spec, self.source = device, spec, spec
        size = getattr(model.visual, "image_size", None) or model.visual.preprocess_cfg["size"]
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(self.encode_text([""], batch_size=1).shape[1])
        self.context_length = int(getattr(tokenizer, "context_length", 0) or 0)

    def preprocess(self, image) -> torch.Tensor:
        """A path, bytes, a PIL image or an array -> open_clip's evaluation transform of it."""
        return self.transform(open_rgb(image))

    def embed_image_batch(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [
            F.normalize(
                self.model.encode_text(self.tokenizer(texts[s : s + batch_size]).to(self.device)).float(), dim=-1
            ).cpu()
            for s in range(0, len(texts), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0].cpu())

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The image mean and std its transform normalises with."""
        cfg = self.model.visual.preprocess_cfg
        return tuple(cfg["mean"]), tuple(cfg["std"])

    def __repr__(self) -> str:
        return (
            f"OpenClipModel({self.spec}, device={self.device}, image_size={self.image_size}, "
            f"embed_dim={self.embed_dim})"
        )


def weights_place(spec: ForeignSpec) -> str:
    """Where open_clip looked for a model's weights, in words."""
    files = "open_clip_model.safetensors or open_clip_pytorch_model.bin"
    if spec.name.startswith("local-dir:"):
        return f"in {spec.path} ({files})"
    if spec.name.startswith("hf-hub:"):
        from huggingface_hub import constants

        offline = f", and HF_HUB_OFFLINE is set: only the cache {constants.HF_HUB_CACHE} was read"
        return f"in the hub repo {spec.name[len('hf-hub:') :]} ({files}{offline if constants.HF_HUB_OFFLINE else ''})"
    return f"from {spec.weights or 'no pretrained tag'}"


def load_open_clip_model(spec: ForeignSpec, device: torch.device, load_weights: bool = True) -> OpenClipModel:
    open_clip = import_open_clip()
    # open_clip fills a hub or local-dir model whose weights it cannot find at random, with a warning:
    # here that is an error, never a random model evaluated under the spec's name.
    kwargs: dict = {"load_weights": load_weights, "require_pretrained": load_weights}
    if not load_weights:
        kwargs["pretrained_text"] = False
    if spec.name.startswith("local-dir:"):
        text_cfg = bundled_text_cfg(spec.path)
        if text_cfg is not None:
            kwargs["text_cfg"] = text_cfg
    pretrained = spec.weights or None
    try:
        model, _, transform = open_clip.create_model_and_transforms(spec.name, pretrained=pretrained, **kwargs)
        tokenizer = open_clip.get_tokenizer(spec.name)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        if str(e).startswith("Required pretrained weights"):
            raise RuntimeError(f"{spec.given}: no weights {weights_place(spec)}") from e
        raise RuntimeError(f"{spec.given}: open_clip could not load it: {e}") from e
    return OpenClipModel(model, tokenizer, transform, device, spec.given)


__all__ = [
    "ClipEvalTransform",
    "bundled_hub_tokenizer",
    "ForeignSpec",
    "OpenClipModel",
    "is_foreign",
    "load_foreign",
    "parse_spec",
]
