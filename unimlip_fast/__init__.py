"""unimlip-fast: a high-throughput trainer for Uni-Mlip medical vision-language pre-training."""

__version__ = "0.1.0"


def load(path, device=None):
    """A finished run folder, an export, ``pmc-clip:PATH`` or ``open_clip:SPEC`` -> a model with
    ``encode_image``, ``encode_text``, ``preprocess`` and ``tokenizer`` (see :mod:`unimlip_fast.loading`)."""
    from .loading import load as load_model

    return load_model(path, device)
