"""A trained model for use: an :class:`EmbeddingModel`, as ``unimlip_fast.load(checkpoint)`` gives
(:mod:`unimlip_fast.loading`: a run folder, an export, or another published model, ``pmc-clip:PATH``
or ``open_clip:SPEC``, :mod:`unimlip_fast.interop`). ``encode_image`` and ``encode_text`` return
L2-normalised float32 embeddings on the CPU, computed in batches on the model's device.
``preprocess`` is the model's evaluation transform (for a run of this project the one retrieval uses:
short side resized, centre crop, CLIP normalisation) and ``tokenizer`` its own tokenizer.
``describe()`` names the model for results files: its spec and a digest of its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config
from .data.cpu_loader import eval_image
from .data.dataset import tokenize_captions
from .data.spec import trim_padding
from .model import UniMlip


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA where there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class EmbeddingModel:
    """Image and text towers with their preprocessing: what evaluation, embedding and search use.

    Subclasses set ``model`` (the module), ``tokenizer``, ``device``, ``spec`` (what the user named),
    ``image_size`` and ``embed_dim``, and give ``preprocess``, ``embed_image_batch``, ``encode_text``
    and ``logit_scale``."""

    model: torch.nn.Module
    device: torch.device
    spec: str
    image_size: int
    embed_dim: int
    native = False  # a run of this project (or its export): retrieval takes the training-time path

    def preprocess(self, image) -> torch.Tensor:
        raise NotImplementedError

    def embed_image_batch(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        raise NotImplementedError

    @property
    def logit_scale(self) -> float:
        """The (exponentiated) temperature the model was trained with."""
        raise NotImplementedError

    def describe(self) -> dict[str, str]:
        """``{"spec", "weights_sha256"}``: which model, so results compare like with like."""
        from .provenance import state_digest

        if not hasattr(self, "_digest"):
            self._digest = state_digest(self.model.state_dict())
        return {"spec": self.spec, "weights_sha256": self._digest}

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64) -> torch.Tensor:
        """A preprocessed ``[B,3,S,S]`` tensor, or one or a list of paths / PIL images -> ``[B,D]``."""
        if isinstance(images, torch.Tensor):
            batches = [images[s : s + batch_size] for s in range(0, len(images), batch_size)]
        else:
            items = [images] if isinstance(images, (str, Path)) or not isinstance(images, Sequence) else list(images)
            batches = (
                torch.stack([self.preprocess(x) for x in items[s : s + batch_size]])
                for s in range(0, len(items), batch_size)
            )
        return _concat([self.embed_image_batch(b) for b in batches], self.embed_dim)


class TrainedModel(EmbeddingModel):
    """The image and text towers of a trained Uni-Mlip, with their preprocessing."""

    def __init__(
        self,
        model: UniMlip,
        tokenizer,
        cfg: Config,
        device: torch.device,
        source: Path | str,
        preprocess=None,
        native: bool = True,
    ):
        self.model, self.tokenizer, self.cfg, self.device, self.source = model.eval(), tokenizer, cfg, device, source
        self.spec = str(Path(source).resolve()) if native else str(source)
        self.image_size = cfg.model.image_size
        self.context_length = cfg.model.text.context_length
        self.embed_dim = cfg.model.embed_dim
        self.native, self._preprocess = native, preprocess

    def preprocess(self, image) -> torch.Tensor:
        """A path, bytes or PIL image -> the normalised ``[3,S,S]`` tensor the image tower takes."""
        if self._preprocess is not None:
            return self._preprocess(image)
        return eval_image(image, self.image_size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.scale().detach().cpu())

    def embed_image_batch(self, images: torch.Tensor) -> torch.Tensor:
        """One preprocessed batch -> normalised float32 embeddings on the CPU."""
        with torch.no_grad():
            out = self.model.encode_image(images.to(self.device, non_blocking=True))
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """One string or a list of strings -> ``[N,D]``, tokenised as evaluation does (unmasked)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for s in range(0, len(texts), batch_size):
            ids, mask = tokenize_captions(self.tokenizer, texts[s : s + batch_size], self.context_length)
            batch = trim_padding(
                {"input_ids": torch.from_numpy(ids).long(), "attention_mask": torch.from_numpy(mask).long()}
            )
            out.append(self.embed_text_batch(batch["input_ids"], batch["attention_mask"]))
        return _concat(out, self.embed_dim)

    def embed_text_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One tokenised batch -> normalised float32 embeddings on the CPU."""
        with torch.no_grad():
            out = self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device))
        return F.normalize(out.float(), dim=-1).cpu()

    def __repr__(self) -> str:
        return (
            f"TrainedModel({self.source}, device={self.device}, image_size={self.image_size}, "
            f"embed_dim={self.embed_dim}, text={self.cfg.model.text.encoder})"
        )


def _concat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dim)
