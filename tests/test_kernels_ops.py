"""The op sets the objective chooses between: same call signatures, lazy Triton import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch

from unimlip_fast.kernels.ops import REFERENCE_OPS, resolve_ops

pytest.importorskip("triton", reason="triton is not installed")

OPS = ("infonce", "ntxent", "dropblock", "itc_terms")


@pytest.mark.parametrize("op", OPS)
def test_triton_ops_take_the_reference_arguments(op):
    from unimlip_fast.kernels.ops import TRITON_OPS

    fused, reference = inspect.signature(getattr(TRITON_OPS, op)), inspect.signature(getattr(REFERENCE_OPS, op))
    names = list(fused.parameters)
    assert names[: len(reference.parameters)] == list(reference.parameters)
    for name in names[len(reference.parameters) :]:  # extras (seed=) are optional
        assert fused.parameters[name].default is not inspect.Parameter.empty


def test_auto_takes_triton_on_cuda_only():
    assert resolve_ops("auto", torch.device("cpu")) is REFERENCE_OPS
    assert resolve_ops("auto", torch.device("cuda")).name == "triton"
    assert resolve_ops("triton", torch.device("cuda")).name == "triton"
    with pytest.raises(ValueError, match="model.kernels"):
        resolve_ops("fast", torch.device("cpu"))


@pytest.mark.parametrize(
    "capability, expected", [((7, 0), "reference"), ((7, 5), "reference"), ((8, 0), "triton"), ((9, 0), "triton")]
)
def test_auto_takes_the_reference_below_sm80_and_says_why(monkeypatch, capability, expected):
    """A V100 (sm_70, faked here) gets the reference under auto, and the log line names the card and why."""
    from unimlip_fast.kernels.ops import kernels_note

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    ops = resolve_ops("auto", torch.device("cuda"))
    assert ops.name == expected
    note = kernels_note("auto", ops, torch.device("cuda"))
    if expected == "reference":
        assert f"sm_{capability[0]}{capability[1]}" in note and "V100" in note and "sm_80" in note, note
    else:
        assert note == "kernels: triton (model.kernels=auto, device cuda)"


def test_triton_off_cuda_runs_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_ops("triton", torch.device("cpu")).name == "triton"


def test_triton_off_cuda_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs a CUDA device.*TRITON_INTERPRET=1"):
        resolve_ops("triton", torch.device("cpu"))
    assert resolve_ops("triton", torch.device("cuda")).name == "triton"


def test_the_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; import unimlip_fast.kernels.ops as k; "
        "assert k.resolve_ops('auto', __import__('torch').device('cpu')).name == 'reference'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


@pytest.mark.gpu  # on a CPU under the interpreter; on a CUDA machine compiled
@pytest.mark.parametrize("switched_off", [(), ("itc_txt_fp",), ("itc", "simclr")])
def test_objective_through_the_fused_kernels_matches_the_reference(switched_off, one_blas_thread):
    """compute_terms with the Triton ops (one itc_terms launch over shared tensors) against the
    reference ops: every term, and the gradients of every feature and of the logit scale."""
    from dataclasses import replace

    from unimlip_fast.config import LossConfig
    from unimlip_fast.kernels.ops import triton_ops
    from unimlip_fast.objective import compute_terms, total_loss

    cfg = replace(LossConfig(), **{name: 0.0 for name in switched_off})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(13, 24, generator=g) for k in ("img", "txt", "img_perturbed", "txt_perturbed")}
    base.update(
        simclr_a=torch.randn(13, 8, generator=g),
        simclr_b=torch.randn(13, 8, generator=g),
        logit_scale=torch.tensor([14.0]),
    )
    base = {k: v.to(device) for k, v in base.items()}

    def run(ops):
        f = {k: v.clone().requires_grad_() for k, v in base.items()}
        terms = compute_terms(f, cfg, ops)
        total_loss(terms, cfg).backward()
        return {k: v.detach() for k, v in terms.items()}, {k: v.grad for k, v in f.items()}

    (ref_terms, ref_grads), (fused_terms, fused_grads) = run(REFERENCE_OPS), run(triton_ops())
    assert set(fused_terms) == set(ref_terms) and not set(switched_off) & set(ref_terms)
    for k in ref_terms:
        torch.testing.assert_close(fused_terms[k], ref_terms[k], rtol=1e-5, atol=1e-6)
    for k in ref_grads:
        if ref_grads[k] is None:
            assert fused_grads[k] is None or not fused_grads[k].any(), k
        else:
            torch.testing.assert_close(fused_grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
