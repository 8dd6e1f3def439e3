"""Fused Triton kernels for the contrastive losses: symmetric InfoNCE and SimCLR's NT-Xent.

Both losses have one shape, so one set of kernels serves them (the references stay in
``infonce.py`` and ``ntxent.py``; this file imports Triton, they do not). Two sides, a and b,
each with local rows X; a row's logits are ``scale`` times its cosines with the gathered
partner columns Y, whose entry ``row_offset + i`` is its positive, and, for NT-Xent only, with
the gathered columns Z of its own side, itself excluded:

    side a: X = r1, Y = c2, Z = c1          side b: X = r2, Y = c1, Z = c2
    loss   = 0.5 / B * sum over both sides and the B local rows of (lse_i - scale * X_i . Y_off+i)

    InfoNCE: r1, r2, c1, c2 = img, txt, img_all, txt_all; scale = the exponentiated logit scale
    NT-Xent: r1, r2, c1, c2 = za, zb, za_all, zb_all;     scale = 1 / tau, self terms on

Several losses can share the same launches (``itc_terms``): the features come as stacked sets,
and loss k takes side-a set sets[k, 0] and side-b set sets[k, 1]; k is a grid axis.

Forward: one program per (row block, side, k) streams column tiles through an online
log-sum-exp and keeps O(B) state: the log-sum-exp, the loss and the derivative by the scale
(softmax-weighted mean cosine minus the positive cosine) of each row.
Backward, with coef = 0.5 * grad * scale / B and P = exp(scale * cosines - lse) recomputed per tile:
    rows kernel:    dX_i = coef * (sum_j P_ij Y_j + sum_j P^self_ij Z_j - Y_off+i)
    columns kernel: dC_j = coef * (sum_i P^partner_ij X^partner_i + sum_i P^self_ij X^self_i - X^partner_j-off)
Both backward kernels own their outputs (no atomics, deterministic). Each program holds a
[rows, BLOCK_D] accumulator, so it recomputes its cosine tiles once per block of D output
features: D / BLOCK_D + 1 products per tile and side (7 at D = 768 on the GPU, 3 at D = 256),
the price of never writing a B x N tile. Products and sums accumulate in fp32; the probabilities
are rounded to the features' dtype for the tensor-core product, as flash-attention does. Offsets are int32: (sets or losses) * N * D must stay below 2**31.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: rows (m), columns (n), the reduction over D (k), output features (d)."""

    m: int = 64
    n: int = 64
    k: int = 64
    d: int = 128
    warps: int = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_blocks(dim: int, dtype: torch.dtype) -> Blocks:
    """GPU: sizes that compile for sm_90 without spilling in bf16 (checked with ptxas, untuned on a
    device). Interpreter: fewer, larger numpy steps, as it has no register file to respect."""
    fit = lambda cap: max(16, min(cap, triton.next_power_of_2(dim)))  # noqa: E731
    if _interpreting():
        return Blocks(m=128, n=128, k=fit(256), d=fit(1024))
    return Blocks(k=fit(32 if dtype == torch.float32 else 64), d=fit(128))


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(upcast, input_precision). Triton's interpreter returns garbage for bf16 dots, so it gets
    fp32 operands (after the same rounding the GPU sees); fp32 on the GPU uses 3xTF32."""
    if _interpreting():
        return True, "ieee"
    return False, "tf32x3" if dtype == torch.float32 else "tf32"


# --- kernels --------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b, accumulated in fp32."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _select(side, first, second):
    """``first`` for side 0, ``second`` for side 1 (pointers chosen per program)."""
    if side == 0:
        out = first
    else:
        out = second
    return out


@triton.jit
def _cosines(
    a_ptr,  # [A, D] the rows of the tile
    b_ptr,  # [Bn, D] the columns of the first tile
    c_ptr,  # [Bn, D] the columns of the second tile (read only with TWO)
    a_idx, b_idx, a_len, b_len, D,
    TWO: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 tiles A[a_idx] . B[b_idx]^T and (TWO) A[a_idx] . C[b_idx]^T, sharing the loads of A."""
    ab = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    ac = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    a_ok = (a_idx < a_len)[:, None]
    b_ok = (b_idx < b_len)[:, None]
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = (kk < D)[None, :]
        a = tl.load(a_ptr + a_idx[:, None] * D + kk[None, :], mask=a_ok & k_ok, other=0.0)
        b = tl.load(b_ptr + b_idx[:, None] * D + kk[None, :], mask=b_ok & k_ok, other=0.0)
        ab = _dot(a, tl.trans(b), ab, UPCAST, PRECISION)
        if TWO:
            c = tl.load(c_ptr + b_idx[:, None] * D + kk[None, :], mask=b_ok & k_ok, other=0.0)
            ac = _dot(a, tl.trans(c), ac, UPCAST, PRECISION)
    return ab, ac


@triton.jit
def _online_lse(logits, cosines, m_i, l_i, w_i):
    """One tile of the streaming log-sum-exp; w_i carries sum(exp(logit - m) * cosine)."""
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    w_i = w_i * alpha + tl.sum(p * cosines, axis=1)
    return m_new, l_i, w_i


@triton.jit
def _fwd_kernel(
    r1_ptr, r2_ptr,  # [S1, B, D], [S2, B, D] local rows of side a and side b, by feature set
    c1_ptr, c2_ptr,  # [S1, N, D], [S2, N, D] gathered columns: side a pairs with c2, side b with c1
    sets_ptr,  # [K, 2] int32: the side-a and side-b feature set of each loss
    scale_ptr,  # [1] fp32 multiplier of the cosines
    lse_ptr,  # [K, 2, B] fp32 out: log-sum-exp of each row's logits
    loss_ptr,  # [K, 2, B] fp32 out: lse - scale * positive cosine
    dscale_ptr,  # [K, 2, B] fp32 out: softmax-weighted mean cosine - positive cosine
    B, N, D, row_offset,
    SELF_TERMS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    k = tl.program_id(1) // 2
    side = tl.program_id(1) % 2
    s1 = tl.load(sets_ptr + 2 * k)
    s2 = tl.load(sets_ptr + 2 * k + 1)
    x_ptr = _select(side, r1_ptr + s1 * B * D, r2_ptr + s2 * B * D)
    y_ptr = _select(side, c2_ptr + s2 * N * D, c1_ptr + s1 * N * D)
    z_ptr = _select(side, c1_ptr + s1 * N * D, c2_ptr + s2 * N * D)
    scale = tl.load(scale_ptr)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        xy, xz = _cosines(x_ptr, y_ptr, z_ptr, rows, cols, B, N, D,
                          SELF_TERMS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        valid = (cols < N)[None, :]
        m_i, l_i, w_i = _online_lse(tl.where(valid, xy * scale, float("-inf")), xy, m_i, l_i, w_i)
        if SELF_TERMS:
            not_self = valid & (cols[None, :] != rows[:, None] + row_offset)
            m_i, l_i, w_i = _online_lse(tl.where(not_self, xz * scale, float("-inf")), xz, m_i, l_i, w_i)

    # The positive cosine, X_i . Y_off+i, row by row.
    row_ok = rows < B
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (kk < D)[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + kk[None, :], mask=mask, other=0.0)
        y = tl.load(y_ptr + (rows + row_offset)[:, None] * D + kk[None, :], mask=mask, other=0.0)
        pos += tl.sum(x.to(tl.float32) * y.to(tl.float32), axis=1)

    lse = m_i + tl.log(l_i)
    out = (k * 2 + side) * B + rows
    tl.store(lse_ptr + out, lse, mask=row_ok)
    tl.store(loss_ptr + out, lse - scale * pos, mask=row_ok)
    tl.store(dscale_ptr + out, w_i / l_i - pos, mask=row_ok)


@triton.jit
def _bwd_rows_kernel(
    r1_ptr, r2_ptr,  # [S1, B, D], [S2, B, D] local rows of side a and side b, by feature set
    c1_ptr, c2_ptr,  # [S1, N, D], [S2, N, D] gathered columns
    sets_ptr,  # [K, 2] int32: the side-a and side-b feature set of each loss
    scale_ptr,  # [1] fp32
    lse_ptr,  # [K, 2, B] fp32 from the forward
    grad_ptr,  # [K] fp32 upstream gradient of each loss
    dr1_ptr, dr2_ptr,  # [K, B, D] out, per loss, in the features' dtype
    B, N, D, row_offset,
    SELF_TERMS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    k = tl.program_id(2) // 2
    side = tl.program_id(2) % 2
    s1 = tl.load(sets_ptr + 2 * k)
    s2 = tl.load(sets_ptr + 2 * k + 1)
    x_ptr = _select(side, r1_ptr + s1 * B * D, r2_ptr + s2 * B * D)
    y_ptr = _select(side, c2_ptr + s2 * N * D, c1_ptr + s1 * N * D)
    z_ptr = _select(side, c1_ptr + s1 * N * D, c2_ptr + s2 * N * D)
    dx_ptr = _select(side, dr1_ptr, dr2_ptr) + k * B * D
    scale = tl.load(scale_ptr)
    coef = 0.5 * tl.load(grad_ptr + k) * scale / B

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    lse = tl.load(lse_ptr + (k * 2 + side) * B + rows, mask=row_ok, other=0.0)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = (dcols < D)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        xy, xz = _cosines(x_ptr, y_ptr, z_ptr, rows, cols, B, N, D,
                          SELF_TERMS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        p = tl.exp(tl.where(col_ok[None, :], xy * scale - lse[:, None], float("-inf")))
        y = tl.load(y_ptr + cols[:, None] * D + dcols[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
        acc = _dot(p.to(y.dtype), y, acc, UPCAST, PRECISION)
        if SELF_TERMS:
            not_self = col_ok[None, :] & (cols[None, :] != rows[:, None] + row_offset)
            p_self = tl.exp(tl.where(not_self, xz * scale - lse[:, None], float("-inf")))
            z = tl.load(z_ptr + cols[:, None] * D + dcols[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
            acc = _dot(p_self.to(z.dtype), z, acc, UPCAST, PRECISION)

    mask = row_ok[:, None] & d_ok
    y_pos = tl.load(y_ptr + (rows + row_offset)[:, None] * D + dcols[None, :], mask=mask, other=0.0)
    dx = coef * (acc - y_pos.to(tl.float32))
    tl.store(dx_ptr + rows[:, None] * D + dcols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_cols_kernel(
    r1_ptr, r2_ptr,  # [S1, B, D], [S2, B, D] local rows of side a and side b, by feature set
    c1_ptr, c2_ptr,  # [S1, N, D], [S2, N, D] gathered columns
    sets_ptr,  # [K, 2] int32: the side-a and side-b feature set of each loss
    scale_ptr,  # [1] fp32
    lse_ptr,  # [K, 2, B] fp32 from the forward
    grad_ptr,  # [K] fp32 upstream gradient of each loss
    dc1_ptr, dc2_ptr,  # [K, N, D] out, per loss, in the features' dtype
    B, N, D, row_offset,
    SELF_TERMS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program (j, d, 2k + t) writes columns j of c1 (t = 0) or c2 (t = 1). The partner side is the
    # one whose positives live in that matrix (c1: side b, c2: side a); the other side reaches it
    # through its self terms.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    k = tl.program_id(2) // 2
    t = tl.program_id(2) % 2
    s1 = tl.load(sets_ptr + 2 * k)
    s2 = tl.load(sets_ptr + 2 * k + 1)
    c_ptr = _select(t, c1_ptr + s1 * N * D, c2_ptr + s2 * N * D)
    xp_ptr = _select(t, r2_ptr + s2 * B * D, r1_ptr + s1 * B * D)
    xs_ptr = _select(t, r1_ptr + s1 * B * D, r2_ptr + s2 * B * D)
    dc_ptr = _select(t, dc1_ptr, dc2_ptr) + k * N * D
    lse_p_ptr = lse_ptr + (k * 2 + 1 - t) * B
    lse_s_ptr = lse_ptr + (k * 2 + t) * B
    scale = tl.load(scale_ptr)
    coef = 0.5 * tl.load(grad_ptr + k) * scale / B

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = (dcols < D)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < B
        cxp, cxs = _cosines(c_ptr, xp_ptr, xs_ptr, cols, rows, N, B, D,
                            SELF_TERMS, UPCAST, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K)  # [BLOCK_N, BLOCK_M]
        lse_p = tl.load(lse_p_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(tl.where(row_ok[None, :], cxp * scale - lse_p[None, :], float("-inf")))
        xp = tl.load(xp_ptr + rows[:, None] * D + dcols[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
        acc = _dot(p.to(xp.dtype), xp, acc, UPCAST, PRECISION)
        if SELF_TERMS:
            lse_s = tl.load(lse_s_ptr + rows, mask=row_ok, other=0.0)
            not_self = row_ok[None, :] & (cols[:, None] != rows[None, :] + row_offset)
            p_self = tl.exp(tl.where(not_self, cxs * scale - lse_s[None, :], float("-inf")))
            xs = tl.load(xs_ptr + rows[:, None] * D + dcols[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
            acc = _dot(p_self.to(xs.dtype), xs, acc, UPCAST, PRECISION)

    # Column j is the positive of local row j - row_offset, if that row is on this rank.
    owner = cols - row_offset
    owned = (owner >= 0) & (owner < B)
    x_pos = tl.load(xp_ptr + owner[:, None] * D + dcols[None, :], mask=owned[:, None] & d_ok, other=0.0)
    dc = coef * (acc - x_pos.to(tl.float32))
    tl.store(dc_ptr + cols[:, None] * D + dcols[None, :], dc.to(dc_ptr.dtype.element_ty), mask=col_ok[:, None] & d_ok)


# --- host launches ----------------------------------------------------------------------------------
def _check(r1, r2, c1, c2, sets) -> None:
    (s1, b, d), (s2, n) = r1.shape, c2.shape[:2]
    assert r2.shape == (s2, b, d) and c1.shape == (s1, n, d) and c2.shape == (s2, n, d), "shapes differ"
    assert len({t.dtype for t in (r1, r2, c1, c2)}) == 1, "features must share one dtype"
    assert all(t.is_contiguous() for t in (r1, r2, c1, c2, sets)) and sets.dtype == torch.int32
    assert max(s1, s2, sets.shape[0]) * max(b, n) * d < 2**31, "int32 offsets"


def contrastive_forward(r1, r2, c1, c2, sets, scale, row_offset: int, self_terms: bool, blocks: Blocks):
    """-> (lse, loss_rows, dscale_rows), each [K, 2, B] fp32."""
    _check(r1, r2, c1, c2, sets)
    k, (b, d), n = sets.shape[0], r1.shape[1:], c1.shape[1]
    lse, loss_rows, dscale_rows = (torch.empty(k, 2, b, device=r1.device, dtype=torch.float32) for _ in range(3))
    upcast, precision = _dot_flags(r1.dtype)
    _fwd_kernel[(triton.cdiv(b, blocks.m), 2 * k)](
        r1, r2, c1, c2, sets, scale, lse, loss_rows, dscale_rows, b, n, d, row_offset,
        SELF_TERMS=self_terms, UPCAST=upcast, PRECISION=precision,
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, num_warps=blocks.warps,
    )
    return lse, loss_rows, dscale_rows


def contrastive_backward(r1, r2, c1, c2, sets, scale, lse, grad, row_offset: int, self_terms: bool, blocks: Blocks):
    """-> (dr1, dr2, dc1, dc2), per loss ([K, B, D] and [K, N, D]) in the features' dtype; ``grad`` [K] fp32."""
    k, (b, d), n = sets.shape[0], r1.shape[1:], c1.shape[1]
    upcast, precision = _dot_flags(r1.dtype)
    flags = dict(SELF_TERMS=self_terms, UPCAST=upcast, PRECISION=precision, BLOCK_M=blocks.m,
                 BLOCK_N=blocks.n, BLOCK_K=blocks.k, BLOCK_D=blocks.d, num_warps=blocks.warps)
    dr1, dr2 = (r1.new_empty(k, b, d) for _ in range(2))
    dc1, dc2 = (c1.new_empty(k, n, d) for _ in range(2))
    d_blocks = triton.cdiv(d, blocks.d)
    _bwd_rows_kernel[(triton.cdiv(b, blocks.m), d_blocks, 2 * k)](
        r1, r2, c1, c2, sets, scale, lse, grad, dr1, dr2, b, n, d, row_offset, **flags)
    _bwd_cols_kernel[(triton.cdiv(n, blocks.n), d_blocks, 2 * k)](
        r1, r2, c1, c2, sets, scale, lse, grad, dc1, dc2, b, n, d, row_offset, **flags)
    return dr1, dr2, dc1, dc2


def _sum_into_sets(per_loss: torch.Tensor, index: torch.Tensor, n_sets: int) -> torch.Tensor:
    """[K, R, D] gradients of each loss -> [n_sets, R, D] gradients of each feature set."""
    if per_loss.shape[0] == n_sets and torch.equal(index, torch.arange(n_sets, device=index.device)):
        return per_loss
    return per_loss.new_zeros(n_sets, *per_loss.shape[1:]).index_add_(0, index.long(), per_loss)


# --- autograd -----------------------------------------------------------------------------------------
class _ContrastiveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r1, r2, c1, c2, scale, sets, row_offset, self_terms, blocks):
        scale32 = scale.detach().float().reshape(1).contiguous()
        lse, loss_rows, dscale_rows = contrastive_forward(r1, r2, c1, c2, sets, scale32, row_offset, self_terms, blocks)
        half_mean = 0.5 / r1.shape[1]
        ctx.save_for_backward(r1, r2, c1, c2, sets, scale32, lse, dscale_rows.sum(dim=(1, 2)) * half_mean)
        ctx.row_offset, ctx.self_terms, ctx.blocks, ctx.scale_meta = row_offset, self_terms, blocks, (scale.shape, scale.dtype)
        return loss_rows.sum(dim=(1, 2)) * half_mean

    @staticmethod
    def backward(ctx, grad_losses):
        r1, r2, c1, c2, sets, scale32, lse, dscale_unit = ctx.saved_tensors
        grad = grad_losses.float().contiguous()
        dr1, dr2, dc1, dc2 = contrastive_backward(
            r1, r2, c1, c2, sets, scale32, lse, grad, ctx.row_offset, ctx.self_terms, ctx.blocks)
        dr1, dc1 = (_sum_into_sets(g, sets[:, 0], r1.shape[0]) for g in (dr1, dc1))
        dr2, dc2 = (_sum_into_sets(g, sets[:, 1], r2.shape[0]) for g in (dr2, dc2))
        dscale = None
        if ctx.needs_input_grad[4]:
            shape, dtype = ctx.scale_meta
            dscale = (grad * dscale_unit).sum().reshape(shape).to(dtype)
        return dr1, dr2, dc1, dc2, dscale, None, None, None, None


def contrastive_losses(r1, r2, c1, c2, scale, sets=None, row_offset: int = 0, self_terms: bool = False,
                       blocks: Blocks | None = None) -> torch.Tensor:
    """[K] fp32 losses (see the module doc). Rows r1 [S1, B, D], r2 [S2, B, D] and columns
    c1 [S1, N, D], c2 [S2, N, D] come in feature sets; loss k takes side-a set sets[k, 0] and side-b
    set sets[k, 1] (default: set k with set k)."""
    if not 0 <= row_offset <= c1.shape[1] - r1.shape[1]:
        raise ValueError(f"rows {row_offset}..{row_offset + r1.shape[1]} are not among the {c1.shape[1]} columns")
    dtype = torch.promote_types(torch.promote_types(r1.dtype, r2.dtype), torch.promote_types(c1.dtype, c2.dtype))
    r1, r2, c1, c2 = (t.to(dtype).contiguous() for t in (r1, r2, c1, c2))
    if sets is None:
        sets = torch.arange(r1.shape[0]).repeat_interleave(2).view(-1, 2)
    sets = torch.as_tensor(sets, dtype=torch.int32).to(r1.device).contiguous()
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=r1.device)
    blocks = blocks or default_blocks(r1.shape[-1], dtype)
    return _ContrastiveFn.apply(r1, r2, c1, c2, scale, sets, row_offset, self_terms, blocks)


# --- the ops the objective calls, with the references' signatures ------------------------------------
def infonce_triton(img, txt, scale, img_all=None, txt_all=None, row_offset: int = 0, blocks: Blocks | None = None):
    """Fused ``infonce_reference``: same arguments, same value, gradients for every input."""
    img_all = img if img_all is None else img_all
    txt_all = txt if txt_all is None else txt_all
    features = (t.unsqueeze(0) for t in (img, txt, img_all, txt_all))
    return contrastive_losses(*features, scale, row_offset=row_offset, blocks=blocks)[0]


def ntxent_triton(za, zb, tau: float, za_all=None, zb_all=None, row_offset: int = 0, blocks: Blocks | None = None):
    """Fused ``ntxent_reference``: same arguments, same value, gradients for every input."""
    za_all = za if za_all is None else za_all
    zb_all = zb if zb_all is None else zb_all
    views = (t.unsqueeze(0) for t in (za, zb, za_all, zb_all))
    scale = torch.full((1,), 1.0 / tau, device=za.device)
    return contrastive_losses(*views, scale, row_offset=row_offset, self_terms=True, blocks=blocks)[0]


def _distinct(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[tuple], list[int]]:
    """Distinct (rows, columns) pairs by identity, and each input's index among them."""
    distinct: list[tuple] = []
    index = []
    for pair in pairs:
        found = [i for i, seen in enumerate(distinct) if seen[0] is pair[0] and seen[1] is pair[1]]
        if not found:
            distinct.append(pair)
        index.append(found[0] if found else len(distinct) - 1)
    return distinct, index


def itc_terms_triton(imgs, txts, scale, imgs_all=None, txts_all=None, row_offset: int = 0,
                     blocks: Blocks | None = None) -> torch.Tensor:
    """Fused ``itc_terms_reference``: K InfoNCE terms in the same three launches. Features that
    several terms share (the same tensor objects) are stacked once and read by all of them, so the
    programs of different terms on the same rows find the shared tiles in L2."""
    imgs_all = imgs if imgs_all is None else imgs_all
    txts_all = txts if txts_all is None else txts_all
    img_sets, img_index = _distinct(list(zip(imgs, imgs_all)))
    txt_sets, txt_index = _distinct(list(zip(txts, txts_all)))
    r1, c1 = (torch.stack([pair[i] for pair in img_sets]) for i in (0, 1))
    r2, c2 = (torch.stack([pair[i] for pair in txt_sets]) for i in (0, 1))
    sets = list(zip(img_index, txt_index))
    return contrastive_losses(r1, r2, c1, c2, scale, sets, row_offset, blocks=blocks)
