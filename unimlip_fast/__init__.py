"""unimlip-fast: a high-throughput trainer for Uni-Mlip medical vision-language pre-training."""

from pathlib import Path

__version__ = "0.1.0"

# The top-level kernels/ and configs/ folders are the subpackages unimlip_fast.kernels and unimlip_fast.configs
# (namespace packages: no __init__.py). A wheel has them inside the package and an editable install maps them
# (pyproject.toml's package-dir); run from a source checkout with only PYTHONPATH set, they are found here, in
# this checkout (not in another one an editable install may point at).
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if not Path(__file__).with_name("kernels").is_dir() and (_SOURCE_ROOT / "kernels" / "ops.py").is_file():
    __path__.append(str(_SOURCE_ROOT))


def load(path, device=None):
    """A finished run folder, an export, ``pmc-clip:PATH`` or ``open_clip:SPEC`` -> a model with
    ``encode_image``, ``encode_text``, ``preprocess`` and ``tokenizer`` (see :mod:`unimlip_fast.loading`)."""
    from .loading import load as load_model

    return load_model(path, device)
