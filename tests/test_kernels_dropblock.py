"""Fused DropBlock against the reference: the same mask from the same random stream, its gradient,
determinism for a seed, and the statistics of the drawn blocks.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unimlip_fast.kernels.dropblock import dropblock_gamma, dropblock_reference

db = pytest.importorskip("unimlip_fast.kernels.dropblock_triton", reason="triton is not installed")
pytestmark = [pytest.mark.usefixtures("one_blas_thread"), pytest.mark.interpreter]

# (shape, block): ResNet's last map, a ragged rectangle, a block larger than the map (3 fits), an
# even block (the largest odd one that fits), the largest map the kernel takes.
CASES = [((2, 3, 7, 7), 3), ((3, 5, 9, 13), 5), ((1, 2, 4, 4), 7), ((2, 2, 6, 8), 4), ((1, 3, 32, 32), 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,block", CASES)
def test_matches_reference_on_the_same_stream(shape, block, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=g).to(dtype)
    out = db.dropblock_triton(x, 0.3, block, seed=1234)
    (grad,) = torch.autograd.grad(out, x, grad_out)

    noise = db.dropblock_noise(shape, block, seed=1234)
    x64 = x.detach().double().requires_grad_()
    want = dropblock_reference(x64, 0.3, block, noise=noise)
    (want_grad,) = torch.autograd.grad(want, x64, grad_out.double())
    assert torch.equal(out == 0, want == 0), "masks differ"
    # bf16: one unit in the last place, as Triton's interpreter truncates fp32 -> bf16 on store.
    tol = dict(rtol=2**-7, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(grad.double(), want_grad, **tol)
    assert out.dtype == grad.dtype == dtype


def test_seed_determines_the_mask():
    x = torch.ones(4, 8, 7, 7)
    torch.manual_seed(5)
    first = db.dropblock_triton(x, 0.3, 3)
    torch.manual_seed(5)
    again = db.dropblock_triton(x, 0.3, 3)
    other = db.dropblock_triton(x, 0.3, 3)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert torch.equal(db.dropblock_triton(x, 0.3, 3, seed=9), db.dropblock_triton(x, 0.3, 3, seed=9))


def test_backward_regenerates_the_forward_mask():
    """Gradient = mask * numel / kept, the forward's mask, with nothing stored between them."""
    x = torch.randn(3, 16, 7, 7, requires_grad=True)
    out = db.dropblock_triton(x, 0.4, 3, seed=77)
    out.backward(torch.ones_like(out))
    mask_times_scale = db.dropblock_triton(torch.ones_like(x), 0.4, 3, seed=77)
    torch.testing.assert_close(x.grad, mask_times_scale, rtol=0, atol=0)
    kept = (mask_times_scale > 0).sum().item()
    torch.testing.assert_close(mask_times_scale.max().item(), x.numel() / kept, rtol=1e-6, atol=0)


def test_dropped_fraction_matches_its_expectation():
    """A pixel survives each of the k centres whose block covers it with probability 1 - gamma:
    E[dropped] = 1 - mean over pixels of (1 - gamma)^k. The kernel's 2048 planes must hit it
    within 5 standard errors, and so must the reference's (a check on the check)."""
    shape, p, block = (32, 64, 7, 7), 0.3, 3
    h, w = shape[-2:]
    gamma = dropblock_gamma(p, block, h, w)
    centres = torch.zeros(1, 1, h, w)
    centres[..., 1:-1, 1:-1] = 1.0
    covering = F.conv2d(centres, torch.ones(1, 1, block, block), padding=block // 2)
    expected = 1.0 - ((1.0 - gamma) ** covering).mean().item()

    ones = torch.ones(shape)
    torch.manual_seed(0)
    for out in (db.dropblock_triton(ones, p, block), dropblock_reference(ones, p, block)):
        per_plane = (out == 0).float().mean(dim=(-2, -1)).flatten()
        stderr = per_plane.std().item() / per_plane.numel() ** 0.5
        assert abs(per_plane.mean().item() - expected) < 5 * stderr, (per_plane.mean().item(), expected)


def test_the_centre_uniforms_are_uniform():
    u = db.dropblock_noise((64, 64, 7, 7), 3, seed=3)[..., 1:-1, 1:-1].flatten()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5
    assert torch.histc(u, bins=10, min=0, max=1).div(u.numel()).sub(0.1).abs().max() < 0.01


def test_off_paths_take_the_reference():
    x = torch.randn(2, 3, 7, 7)
    assert db.dropblock_triton(x, 0.0, 3) is x
    noise = torch.rand(x.shape)
    want = dropblock_reference(x, 0.3, 3, noise=noise)
    torch.testing.assert_close(db.dropblock_triton(x, 0.3, 3, noise=noise), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the compiled kernel)")
def test_matches_reference_on_gpu():
    shape = (96, 2048, 7, 7)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = db.dropblock_triton(x, 0.5, 3, seed=11)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    noise = db.dropblock_noise(shape, 3, seed=11, device="cuda")
    want = dropblock_reference(x.detach().float(), 0.5, 3, noise=noise)
    torch.testing.assert_close(out.float(), want, rtol=2**-8, atol=0)
    mask_times_scale = dropblock_reference(torch.ones(shape, device="cuda"), 0.5, 3, noise=noise)
    torch.testing.assert_close(grad.float(), mask_times_scale, rtol=2**-8, atol=0)
