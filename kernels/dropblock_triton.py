"""Fused DropBlock: the block mask drawn from a Philox seed, never stored.

Same op as ``dropblock_reference`` (beside it in ``dropblock.py``): block centres are drawn with
the rate gamma where a whole block fits, dilated to b x b blocks, and the output is normalised by
the kept fraction of the whole tensor, out = x * mask * numel / max(sum(mask), 1), as the reference
(Ghiasi's reference and timm) does. Only the random stream differs: one Philox uniform per
possible centre, counter ``offset + plane * centres_per_plane + centre``, instead of one per element;
``dropblock_noise`` writes that stream out as the reference's ``noise`` argument, under which the
two agree exactly.

Each program takes PLANES planes of H x W, flattened. The dilation is one small matrix product:
hits[plane, pixel] = sum over centres of drawn[plane, centre] * covers[centre, pixel], where covers
says which pixels a centre's block covers; a pixel is kept where no drawn block covers it. Being a
global normalisation, the forward takes two launches of the same kernel: a count pass that adds
the number of kept elements to one int32 on the device (no host sync), then the apply pass, which
regenerates the mask and writes x * mask * numel / kept. The backward is the apply pass on the
incoming gradient, with the same seed and count.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dropblock import dropblock_gamma, dropblock_reference

MAX_PIXELS = 1024  # planes of up to 32 x 32 (ResNet's last maps); larger ones take the reference


@triton.jit
def _dropblock_kernel(
    x_ptr,  # [P, H * W] input: the planes of [N, C, H, W] (read by the apply pass)
    out_ptr,  # [P, H * W] output (written by the apply pass)
    kept_ptr,  # [1] int32 kept elements of the whole tensor: the count pass adds, the apply pass reads
    seed,
    offset,
    P,
    H,
    W,
    gamma,
    numel,
    BLOCK: tl.constexpr,  # the (odd) block size b
    APPLY: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # fp16 on the GPU (0/1 and small counts are exact); fp32 when interpreting
    PLANES: tl.constexpr,
    PIXELS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    HALF: tl.constexpr = BLOCK // 2
    planes = tl.program_id(0) * PLANES + tl.arange(0, PLANES)
    plane_ok = planes < P
    pix = tl.arange(0, PIXELS)
    pix_h = pix // W
    pix_w = pix % W
    centres_w = W - BLOCK + 1
    centres = (H - BLOCK + 1) * centres_w

    hits = tl.zeros((PLANES, PIXELS), dtype=tl.float32)
    for c0 in range(0, centres, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < centres
        u = tl.rand(seed, offset + planes[:, None] * centres + c[None, :])
        drawn = (u < gamma) & plane_ok[:, None] & c_ok[None, :]  # [PLANES, BLOCK_C]
        c_h = c // centres_w + HALF
        c_w = c % centres_w + HALF
        covers = (tl.abs(pix_h[None, :] - c_h[:, None]) <= HALF) & (tl.abs(pix_w[None, :] - c_w[:, None]) <= HALF)
        covers = covers & c_ok[:, None]  # [BLOCK_C, PIXELS]
        hits = tl.dot(drawn.to(DOT_DTYPE), covers.to(DOT_DTYPE), hits)

    inside = plane_ok[:, None] & (pix < H * W)[None, :]
    keep = (hits == 0.0) & inside
    if APPLY:
        scale = numel / tl.maximum(tl.load(kept_ptr), 1).to(tl.float32)
        ptrs = planes[:, None] * (H * W) + pix[None, :]
        x = tl.load(x_ptr + ptrs, mask=inside, other=0.0)
        y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + ptrs, y.to(out_ptr.dtype.element_ty), mask=inside)
    else:
        tl.atomic_add(kept_ptr, tl.sum(keep.to(tl.int32)))


@triton.jit
def _centre_uniforms_kernel(
    out_ptr,  # [P * centres] fp32: the uniform the kernel above draws for each possible centre
    seed,
    offset,
    total,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, tl.rand(seed, offset + idx), mask=idx < total)


# --- host launches ----------------------------------------------------------------------------------
# The jitted kernel by name, for tools that compile it ahead of time (tests/test_kernels_compile.py).
JIT_KERNELS = {"dropblock": _dropblock_kernel}


def effective_block(block_size: int, height: int, width: int) -> int:
    """As the reference: the block shrinks to the map, and to the largest odd size that fits."""
    b = min(block_size, height, width)
    return b - (1 - b % 2)


def launch_layout(height: int, width: int, block: int) -> tuple[dict[str, int], int]:
    """(tile sizes, warps): sizes that compile for sm_90 without spilling (checked with ptxas for
    7x7, 14x14 and 32x32 maps; untuned on a device)."""
    pixels = max(16, triton.next_power_of_2(height * width))
    centres = (height - block + 1) * (width - block + 1)
    planes = max(16, min(64, 4096 // pixels))
    chunk = max(16, min(32 if pixels <= 256 else 16, triton.next_power_of_2(centres)))
    return dict(PLANES=planes, PIXELS=pixels, BLOCK_C=chunk), 4 if planes * pixels <= 4096 else 8


def dropblock_apply(
    x: torch.Tensor, p: float, block_size: int, seed: int, offset: int = 0, kept: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (x * mask * numel / kept, kept). Counts the kept elements first unless ``kept`` is given."""
    n, c, h, w = x.shape
    assert x.is_contiguous() and h * w <= MAX_PIXELS and x.numel() < 2**31
    b = effective_block(block_size, h, w)
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    layout, warps = launch_layout(h, w, b)
    args = (seed, offset, n * c, h, w, dropblock_gamma(p, b, h, w), float(x.numel()))
    flags = dict(BLOCK=b, DOT_DTYPE=tl.float32 if interpreting else tl.float16, num_warps=warps, **layout)
    grid = (triton.cdiv(n * c, layout["PLANES"]),)
    if kept is None:
        kept = torch.zeros(1, dtype=torch.int32, device=x.device)
        _dropblock_kernel[grid](x, x, kept, *args, APPLY=False, **flags)
    out = torch.empty_like(x)
    _dropblock_kernel[grid](x, out, kept, *args, APPLY=True, **flags)
    return out, kept


def dropblock_noise(
    shape: tuple[int, int, int, int], block_size: int, seed: int, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The kernel's random stream as the reference's ``noise`` [N, C, H, W]: its uniform at each
    possible block centre, 1 elsewhere (never a centre). For tests."""
    n, c, h, w = shape
    b = effective_block(block_size, h, w)
    half, rows, cols = b // 2, h - b + 1, w - b + 1
    uniforms = torch.empty(n * c * rows * cols, device=device, dtype=torch.float32)
    grid = (triton.cdiv(uniforms.numel(), 1024),)
    _centre_uniforms_kernel[grid](uniforms, seed, offset, uniforms.numel(), BLOCK=1024)
    noise = torch.ones(shape, device=device, dtype=torch.float32)
    noise[:, :, half : half + rows, half : half + cols] = uniforms.view(n, c, rows, cols)
    return noise


# --- the custom op: one op for fake tensors, the meta device and torch.compile; its autograd ---------------
@torch.library.custom_op("unimlip::dropblock", mutates_args=())
def dropblock_op(
    x: torch.Tensor, p: float, block_size: int, seed: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with blocks dropped, the kept count [1] int32 the backward reuses). ``seed``: the Philox seed
    as a [1] int64 CPU tensor, read here, where it is real: drawn outside and read there, it would
    break a ``torch.compile`` graph (a ``.item()``)."""
    return dropblock_apply(x, p, block_size, int(seed.item()), offset)


@dropblock_op.register_fake
def _dropblock_shapes(x, p, block_size, seed, offset):
    return torch.empty_like(x), x.new_empty(1, dtype=torch.int32)


@torch.library.custom_op("unimlip::dropblock_backward", mutates_args=())
def dropblock_backward_op(
    grad_out: torch.Tensor, kept: torch.Tensor, p: float, block_size: int, seed: torch.Tensor, offset: int
) -> torch.Tensor:
    """The apply pass on the incoming gradient: the same mask (same seed) and the same count."""
    return dropblock_apply(grad_out.contiguous(), p, block_size, int(seed.item()), offset, kept=kept)[0]


@dropblock_backward_op.register_fake
def _dropblock_backward_shape(grad_out, kept, p, block_size, seed, offset):
    return torch.empty_like(grad_out)


def _save_for_dropblock_backward(ctx, inputs, output) -> None:
    _, p, block_size, seed, offset = inputs
    ctx.save_for_backward(output[1], seed)
    ctx.args = (p, block_size, offset)


def _dropblock_backward(ctx, grad_out, _grad_kept):
    kept, seed = ctx.saved_tensors
    p, block_size, offset = ctx.args
    return dropblock_backward_op(grad_out, kept, p, block_size, seed, offset), None, None, None, None


dropblock_op.register_autograd(_dropblock_backward, setup_context=_save_for_dropblock_backward)


def dropblock_triton(
    x: torch.Tensor,  # [N, C, H, W]
    p: float,
    block_size: int,
    noise: torch.Tensor | None = None,  # given: the reference's path, with this noise
    generator: torch.Generator | None = None,  # where the Philox seed is drawn from
    seed: int | None = None,  # a fixed Philox seed instead of a drawn one
    offset: int = 0,  # Philox counter offset
) -> torch.Tensor:
    """Fused ``dropblock_reference``. The seed is drawn from torch's RNG (the default CPU generator
    unless ``generator`` is given), so ``torch.manual_seed`` makes runs repeatable. Maps of more
    than MAX_PIXELS pixels, and explicit ``noise``, take the reference."""
    if p <= 0.0:
        return x
    if noise is not None or x.shape[-2] * x.shape[-1] > MAX_PIXELS:
        return dropblock_reference(x, p, block_size, noise=noise, generator=generator)
    if seed is None:
        device = generator.device if generator is not None else "cpu"
        seed_cpu = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device).cpu()
    else:
        seed_cpu = torch.tensor([seed], dtype=torch.int64)
    return dropblock_op(x.contiguous(), p, block_size, seed_cpu, offset)[0]
