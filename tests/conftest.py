"""Shared fixtures: tiny configs and models that run in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

from .helpers import CAPTIONS, TINY_OVERRIDES, make_run_folder


@pytest.fixture
def tiny_cfg():
    from unimlip_fast.config import load_config

    return load_config(None, TINY_OVERRIDES)


@pytest.fixture
def tiny_tokenizer(tiny_cfg):
    from unimlip_fast.model import build_tokenizer

    return build_tokenizer(tiny_cfg.model.text, CAPTIONS)


@pytest.fixture
def tiny_batch(tiny_cfg, tiny_tokenizer):
    """A batch of 6 in the loader's contract, strong views and MLM labels included."""
    g = torch.Generator().manual_seed(0)
    b, size, length = 6, tiny_cfg.model.image_size, tiny_cfg.model.text.context_length
    tok = tiny_tokenizer(CAPTIONS[:b], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    labels = torch.full((b, length), -100)
    labels[:, 2] = tok["input_ids"][:, 2]
    ids = tok["input_ids"].clone()
    ids[:, 2] = tiny_tokenizer.mask_token_id
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "image_a": torch.randn(b, 3, size, size, generator=g),
        "image_b": torch.randn(b, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": tok["attention_mask"],
        "mlm_labels": labels,
    }


# --- kernels -------------------------------------------------------------------------------
# Without a GPU the Triton kernels run in Triton's interpreter; this must be set before anything
# imports triton, which is why it lives here and not in the kernel test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``interpreter`` run the Triton kernels on CPU tensors in Triton's interpreter;
    on a CUDA machine, where Triton compiles instead, they are skipped, and the GPU cases (``gpu``
    in the name or the ``gpu`` marker) run the compiled kernels."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(
        reason="runs Triton's interpreter on CPU tensors; this machine compiles for CUDA "
        "(the GPU cases cover it; TRITON_INTERPRET=1 runs these)"
    )
    for item in items:
        on_gpu = "gpu" in item.name or "cuda" in item.name or item.get_closest_marker("gpu") is not None
        if item.get_closest_marker("interpreter") is not None and not on_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_blas_thread():
    """The interpreter runs each tl.dot as a small numpy matmul; on a loaded machine OpenBLAS's
    threads make those ~100x slower. Kernel test modules opt in with ``usefixtures``."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# --- end kernels -------------------------------------------------------------------------------------


# --- trained-model use -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return make_run_folder(tmp_path_factory.mktemp("tiny_run"), TINY_OVERRIDES)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Six small PNG/JPEG scans of different sizes and modes, and one file that is not an image."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(80, 96), (64, 64), (120, 70), (50, 90), (100, 100), (72, 130)]):
        pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
        image = Image.fromarray(pixels, "L") if i % 2 else Image.fromarray(np.stack([pixels] * 3, -1), "RGB")
        image.save(folder / (f"scan{i}.png" if i % 3 else f"scan{i}.jpg"))
    (folder / "broken.png").write_bytes(b"not an image")
    return folder
