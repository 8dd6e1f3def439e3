"""The op sets the objective chooses between: same call signatures, lazy Triton import."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from unimlip_fast.kernels import REFERENCE_OPS, resolve_ops

pytest.importorskip("triton", reason="triton is not installed")

OPS = ("infonce", "ntxent", "dropblock", "itc_terms")


@pytest.mark.parametrize("op", OPS)
def test_triton_ops_take_the_reference_arguments(op):
    from unimlip_fast.kernels import TRITON_OPS

    fused, reference = inspect.signature(getattr(TRITON_OPS, op)), inspect.signature(getattr(REFERENCE_OPS, op))
    names = list(fused.parameters)
    assert names[: len(reference.parameters)] == list(reference.parameters)
    for name in names[len(reference.parameters):]:  # extras (seed=, blocks=) are optional
        assert fused.parameters[name].default is not inspect.Parameter.empty


def test_auto_takes_triton_on_cuda_only():
    assert resolve_ops("auto", torch.device("cpu")) is REFERENCE_OPS
    assert resolve_ops("auto", torch.device("cuda")).name == "triton"
    assert resolve_ops("triton", torch.device("cpu")).name == "triton"
    with pytest.raises(ValueError, match="model.kernels"):
        resolve_ops("fast", torch.device("cpu"))


def test_triton_off_cuda_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device.*TRITON_INTERPRET=1"):
        resolve_ops("triton", torch.device("cpu"))
    assert resolve_ops("triton", torch.device("cuda")).name == "triton"


def test_the_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import unimlip_fast.kernels as k; "
            "assert k.resolve_ops('auto', __import__('torch').device('cpu')).name == 'reference'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
