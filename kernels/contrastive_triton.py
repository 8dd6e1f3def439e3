"""Fused Triton kernels for the contrastive losses: symmetric InfoNCE and SimCLR's NT-Xent.

Both losses have one shape, so one set of kernels serves them (the references stay in
``infonce.py`` and ``ntxent.py``; this file imports Triton, they do not). A loss has two sides,
a and b, each with local rows X; a row's logits are ``scale`` times its cosines with the gathered
partner columns Y, whose entry ``row_offset + i`` is its positive, and, for NT-Xent only, with
the gathered columns Z of its own side, itself excluded:

    a loss is (r1, r2, c1, c2):  side a: X = r1, Y = c2, Z = c1     side b: X = r2, Y = c1, Z = c2
    loss = 0.5 / B * sum over both sides and the B local rows of (lse_i - scale * X_i . Y_off+i)

    InfoNCE: (img, txt, img_all, txt_all), scale = the exponentiated logit scale
    NT-Xent: (za, zb, za_all, zb_all),     scale = 1 / tau; with the self terms for SLIP's 2N - 1
             candidates (``negatives="all"``), without them for the paper's cross-view Eq. 2

Several losses run in the same launches (``itc_terms``), reading their features in place: the
kernels take int64 tables of tensor addresses, so a feature shared by several losses is neither
copied nor given more than one gradient buffer.

Forward: one program per (row block, loss, side) streams column tiles through an online
log-sum-exp and keeps O(B) state: the log-sum-exp, the loss and the derivative by the scale
(softmax-weighted mean cosine minus the positive cosine) of each row.
Backward, with coef = 0.5 * grad * scale / B and P = exp(scale * cosines - lse) recomputed per
tile, one program per tile of one distinct feature tensor, summing every loss that reads it:
    rows kernel:    dX = sum over (loss, side) with rows X of coef * ((P - I) Y + P^self Z)
    columns kernel: dC = sum over (loss, side) with columns C of coef * ((P - I)^T X + P^self^T X^self)
where I marks each row's positive (column row_offset + i), subtracted in the tile before rounding.
A tensor that is both rows and columns (one process: img is img_all) gets one buffer: the
columns kernel adds to what the rows kernel wrote. Every output tile has one owner (no atomics,
deterministic). Each program holds a [rows, BLOCK_D] accumulator, so it recomputes its cosine
tiles once per block of D output features: D / BLOCK_D + 1 products per tile (4 at D = 768 on
the GPU, 3 at D = 256), the price of never writing a B x N tile. Products and sums accumulate
in fp32; the probabilities are rounded to the features' dtype for the tensor-core product, as
flash-attention does. Offsets are int32: N * D must stay below 2**31.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .ntxent import check_negatives


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: rows (m), columns (n), the reduction over D (k), output features (d)."""

    m: int = 64
    n: int = 64
    k: int = 64
    d: int = 128
    warps: int = 8


@dataclass(frozen=True)
class Launch:
    """What a launch needs besides the features: the first local row's column (``row_offset``),
    whether each side's own views are candidates (``self_terms``) and the tile sizes. At the
    custom ops' boundary it travels as a flat list of ints (:meth:`fields`)."""

    row_offset: int
    self_terms: bool
    blocks: Blocks

    def fields(self) -> list[int]:
        b = self.blocks
        return [self.row_offset, int(self.self_terms), b.m, b.n, b.k, b.d, b.warps]

    @classmethod
    def from_fields(cls, fields: list[int]) -> Launch:
        row_offset, self_terms, *blocks = fields
        return cls(row_offset, bool(self_terms), Blocks(*blocks))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_blocks(dim: int, dtype: torch.dtype, self_terms: bool = False) -> Blocks:
    """GPU: sizes that compile for sm_90 without spilling in bf16 (checked with ptxas; untuned on a
    device). InfoNCE takes 256 output features per program (4 products per tile at D = 768, not
    7); NT-Xent's second accumulator leaves room for 128. Interpreter: fewer, larger numpy steps,
    as it has no register file to respect."""
    fit = lambda cap: max(16, min(cap, triton.next_power_of_2(dim)))
    if _interpreting():
        return Blocks(m=128, n=128, k=fit(256), d=fit(1024))
    if dtype == torch.float32:
        return Blocks(k=fit(32), d=fit(128))
    return Blocks(k=fit(64), d=fit(128 if self_terms else 256))


def dot_flags(dtype: torch.dtype, capability: tuple[int, int] | None = None) -> tuple[bool, str]:
    """(upcast, input_precision) for features of ``dtype`` on a GPU of ``capability``. Triton's
    interpreter returns garbage for bf16 dots, so it gets fp32 operands (after the same rounding
    the GPU sees); fp32 on the GPU uses 3xTF32. Before Ampere (V100, sm_70) triton's dots run on FMA
    units: fp32 operands there spill a few hundred bytes per program where fp16 ones spill ~20 KB
    (ptxas, bench/bench_compile.py), and the products stay exact in fp32."""
    if _interpreting() or (capability is not None and capability < (8, 0)):
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
def _address(table_ptr, i, DTYPE: tl.constexpr):
    """Entry i of an int64 table of tensor addresses, as a pointer to DTYPE. The host aligns every
    tensor to 16 bytes; saying so lets the compiler vectorise and pipeline the loads."""
    return tl.multiple_of(tl.load(table_ptr + i).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _cosines(
    a_ptr,  # [A, D] the rows of the tile
    b_ptr,  # [Bn, D] the columns of the first tile
    c_ptr,  # [Bn, D] the columns of the second tile (read only with TWO)
    a_idx,
    b_idx,
    a_len,
    b_len,
    D,
    TWO: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
    table_ptr,  # [K * 2, 3] int64: addresses of X [B, D], Y [N, D], Z [N, D] per (loss, side)
    scale_ptr,  # [1] fp32 multiplier of the cosines
    lse_ptr,  # [K * 2, B] fp32 out: log-sum-exp of each row's logits
    loss_ptr,  # [K * 2, B] fp32 out: lse - scale * positive cosine
    dscale_ptr,  # [K * 2, B] fp32 out: softmax-weighted mean cosine - positive cosine
    B,
    N,
    D,
    row_offset,
    DTYPE: tl.constexpr,
    SELF_TERMS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    side = tl.program_id(1)  # loss * 2 + side
    x_ptr = _address(table_ptr, side * 3, DTYPE)
    y_ptr = _address(table_ptr, side * 3 + 1, DTYPE)
    z_ptr = _address(table_ptr, side * 3 + 2, DTYPE)
    scale = tl.load(scale_ptr)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        xy, xz = _cosines(
            x_ptr, y_ptr, z_ptr, rows, cols, B, N, D, SELF_TERMS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K
        )
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
    out = side * B + rows
    tl.store(lse_ptr + out, lse, mask=row_ok)
    tl.store(loss_ptr + out, lse - scale * pos, mask=row_ok)
    tl.store(dscale_ptr + out, w_i / l_i - pos, mask=row_ok)


@triton.jit
def _bwd_rows_kernel(
    out_ptr,  # [R, 4] int64 per row tensor: address of X [B, D], of its gradient [B, D], first use, uses
    use_ptr,  # [U, 4] int64 per use as rows: address of Y [N, D], of Z [N, D], lse row (loss * 2 + side), loss
    scale_ptr,  # [1] fp32
    lse_ptr,  # [K * 2, B] fp32 from the forward
    grad_ptr,  # [K] fp32 upstream gradient of each loss
    B,
    N,
    D,
    row_offset,
    DTYPE: tl.constexpr,
    SELF_TERMS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = tl.program_id(2)
    x_ptr = _address(out_ptr, t * 4, DTYPE)
    dx_ptr = _address(out_ptr, t * 4 + 1, DTYPE)
    first = tl.load(out_ptr + t * 4 + 2).to(tl.int32)
    uses = tl.load(out_ptr + t * 4 + 3).to(tl.int32)
    scale = tl.load(scale_ptr)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = (dcols < D)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for u in range(first, first + uses):
        y_ptr = _address(use_ptr, u * 4, DTYPE)
        z_ptr = _address(use_ptr, u * 4 + 1, DTYPE)
        lse_row = tl.load(use_ptr + u * 4 + 2).to(tl.int32)
        coef = 0.5 * tl.load(grad_ptr + tl.load(use_ptr + u * 4 + 3)) * scale / B
        lse = tl.load(lse_ptr + lse_row * B + rows, mask=row_ok, other=0.0)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            xy, xz = _cosines(
                x_ptr, y_ptr, z_ptr, rows, cols, B, N, D, SELF_TERMS, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K
            )
            p = tl.exp(tl.where(col_ok[None, :], xy * scale - lse[:, None], float("-inf")))
            # The positive's -1 goes in before the rounding to DTYPE: P_ii - 1 is tiny when P_ii is near 1.
            p = coef * tl.where(cols[None, :] == rows[:, None] + row_offset, p - 1.0, p)
            y = tl.load(y_ptr + cols[:, None] * D + dcols[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
            acc = _dot(p.to(DTYPE), y, acc, UPCAST, PRECISION)
            if SELF_TERMS:
                not_self = col_ok[None, :] & (cols[None, :] != rows[:, None] + row_offset)
                p_self = coef * tl.exp(tl.where(not_self, xz * scale - lse[:, None], float("-inf")))
                z = tl.load(z_ptr + cols[:, None] * D + dcols[None, :], mask=col_ok[:, None] & d_ok, other=0.0)
                acc = _dot(p_self.to(DTYPE), z, acc, UPCAST, PRECISION)

    tl.store(dx_ptr + rows[:, None] * D + dcols[None, :], acc.to(DTYPE), mask=row_ok[:, None] & d_ok)


@triton.jit
def _bwd_cols_kernel(
    out_ptr,  # [C, 5] int64 per column tensor: address of C [N, D], of its gradient [N, D], first use,
    # uses, and 1 where the rows kernel has already written part of that gradient
    use_ptr,  # [U, 5] int64 per use as columns: address of the partner rows Xp [B, D], of the self rows
    # Xs [B, D], their lse rows (loss * 2 + side), loss
    scale_ptr,  # [1] fp32
    lse_ptr,  # [K * 2, B] fp32 from the forward
    grad_ptr,  # [K] fp32 upstream gradient of each loss
    B,
    N,
    D,
    row_offset,
    DTYPE: tl.constexpr,
    SELF_TERMS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The partner rows are those whose positives live in C (C = c1: side b, C = c2: side a); the
    # other side's rows reach C through their self terms (NT-Xent).
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    t = tl.program_id(2)
    c_ptr = _address(out_ptr, t * 5, DTYPE)
    dc_ptr = _address(out_ptr, t * 5 + 1, DTYPE)
    first = tl.load(out_ptr + t * 5 + 2).to(tl.int32)
    uses = tl.load(out_ptr + t * 5 + 3).to(tl.int32)
    accumulate = tl.load(out_ptr + t * 5 + 4)
    scale = tl.load(scale_ptr)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = (dcols < D)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for u in range(first, first + uses):
        xp_ptr = _address(use_ptr, u * 5, DTYPE)
        xs_ptr = _address(use_ptr, u * 5 + 1, DTYPE)
        lse_p_row = tl.load(use_ptr + u * 5 + 2).to(tl.int32)
        lse_s_row = tl.load(use_ptr + u * 5 + 3).to(tl.int32)
        coef = 0.5 * tl.load(grad_ptr + tl.load(use_ptr + u * 5 + 4)) * scale / B
        for m0 in range(0, B, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < B
            cxp, cxs = _cosines(
                c_ptr, xp_ptr, xs_ptr, cols, rows, N, B, D, SELF_TERMS, UPCAST, PRECISION, BLOCK_N, BLOCK_M, BLOCK_K
            )  # [BLOCK_N, BLOCK_M]
            lse_p = tl.load(lse_ptr + lse_p_row * B + rows, mask=row_ok, other=0.0)
            p = tl.exp(tl.where(row_ok[None, :], cxp * scale - lse_p[None, :], float("-inf")))
            # Column j is the positive of local row j - row_offset: its -1, as in the rows kernel.
            p = coef * tl.where((cols[:, None] == rows[None, :] + row_offset) & row_ok[None, :], p - 1.0, p)
            xp = tl.load(xp_ptr + rows[:, None] * D + dcols[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
            acc = _dot(p.to(DTYPE), xp, acc, UPCAST, PRECISION)
            if SELF_TERMS:
                lse_s = tl.load(lse_ptr + lse_s_row * B + rows, mask=row_ok, other=0.0)
                not_self = row_ok[None, :] & (cols[:, None] != rows[None, :] + row_offset)
                p_self = coef * tl.exp(tl.where(not_self, cxs * scale - lse_s[None, :], float("-inf")))
                xs = tl.load(xs_ptr + rows[:, None] * D + dcols[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
                acc = _dot(p_self.to(DTYPE), xs, acc, UPCAST, PRECISION)

    ptrs = dc_ptr + cols[:, None] * D + dcols[None, :]
    mask = col_ok[:, None] & d_ok
    if accumulate != 0:
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(DTYPE), mask=mask)


# --- host launches ----------------------------------------------------------------------------------
Loss = tuple  # (r1, r2, c1, c2) as indices into the list of distinct features
# The jitted kernels by name, for tools that compile them ahead of time (tests/test_kernels_compile.py).
JIT_KERNELS = {"fwd": _fwd_kernel, "bwd_rows": _bwd_rows_kernel, "bwd_cols": _bwd_cols_kernel}
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _tables(device: torch.device, *tables: list[list[int]]) -> list[torch.Tensor]:
    """int64 tables on the device, flattened: one copy for all of them, which does not make the
    host wait for the GPU."""
    flat = [[value for row in table for value in row] for table in tables]
    packed = torch.tensor([v for f in flat for v in f], dtype=torch.int64, pin_memory=device.type == "cuda")
    return list(packed.to(device, non_blocking=True).split([len(f) for f in flat]))


def _flags(features: list[torch.Tensor], launch: Launch) -> dict:
    blocks, device = launch.blocks, features[0].device
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    upcast, precision = dot_flags(features[0].dtype, capability)
    return dict(
        DTYPE=TL_DTYPES[features[0].dtype],
        SELF_TERMS=launch.self_terms,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
        num_warps=blocks.warps,
    )


def contrastive_forward(features, losses: list[Loss], scale, launch: Launch):
    """-> (lse, loss_rows, dscale_rows), each [K * 2, B] fp32, row loss * 2 + side."""
    blocks = launch.blocks
    (b, d), n = features[losses[0][0]].shape, features[losses[0][2]].shape[0]
    sides = []
    for r1, r2, c1, c2 in losses:
        sides += [[features[i].data_ptr() for i in (r1, c2, c1)], [features[i].data_ptr() for i in (r2, c1, c2)]]
    lse, loss_rows, dscale_rows = (torch.empty(len(sides), b, device=scale.device) for _ in range(3))
    (table,) = _tables(scale.device, sides)
    _fwd_kernel[(triton.cdiv(b, blocks.m), len(sides))](
        table, scale, lse, loss_rows, dscale_rows, b, n, d, launch.row_offset, **_flags(features, launch)
    )
    return lse, loss_rows, dscale_rows


def contrastive_backward(features, losses: list[Loss], scale, lse, grad, launch: Launch) -> list[torch.Tensor | None]:
    """-> the gradient of each feature (None for those no loss reads); ``grad`` [K] fp32."""
    blocks, row_offset = launch.blocks, launch.row_offset
    (b, d), n = features[losses[0][0]].shape, features[losses[0][2]].shape[0]
    address = [f.data_ptr() for f in features]
    grads = [None] * len(features)
    flags = dict(BLOCK_D=blocks.d, **_flags(features, launch))
    d_blocks = triton.cdiv(d, blocks.d)

    # Uses as rows: (Y, Z, lse row, loss), grouped by the rows' tensor.
    row_uses = {}
    for k, (r1, r2, c1, c2) in enumerate(losses):
        row_uses.setdefault(r1, []).append([address[c2], address[c1], 2 * k, k])
        row_uses.setdefault(r2, []).append([address[c1], address[c2], 2 * k + 1, k])
    # Uses as columns: (partner rows, self rows, their lse rows, loss), grouped by the columns' tensor.
    col_uses = {}
    for k, (r1, r2, c1, c2) in enumerate(losses):
        col_uses.setdefault(c1, []).append([address[r2], address[r1], 2 * k + 1, 2 * k, k])
        col_uses.setdefault(c2, []).append([address[r1], address[r2], 2 * k, 2 * k + 1, k])

    for i in set(row_uses) | set(col_uses):
        grads[i] = torch.empty_like(features[i])
    row_outs, row_flat = _grouped(row_uses, address, grads, lambda i: [])
    col_outs, col_flat = _grouped(col_uses, address, grads, lambda i: [int(i in row_uses)])
    tables = _tables(scale.device, row_outs, row_flat, col_outs, col_flat)
    _bwd_rows_kernel[(triton.cdiv(b, blocks.m), d_blocks, len(row_outs))](
        tables[0], tables[1], scale, lse, grad, b, n, d, row_offset, **flags
    )
    _bwd_cols_kernel[(triton.cdiv(n, blocks.n), d_blocks, len(col_outs))](
        tables[2], tables[3], scale, lse, grad, b, n, d, row_offset, **flags
    )
    return grads


def _grouped(uses_by_tensor: dict, address, grads, extra) -> tuple[list, list]:
    """-> (per tensor: its address, its gradient's, first use, uses, *extra(i); the uses, flat)."""
    outs, flat = [], []
    for i, uses in uses_by_tensor.items():
        outs.append([address[i], grads[i].data_ptr(), len(flat), len(uses), *extra(i)])
        flat += uses
    return outs, flat


# --- the custom ops: one op for fake tensors, the meta device and torch.compile; their autograd ----------
def _losses_of(indices: list[int]) -> list[tuple[int, int, int, int]]:
    return [tuple(indices[i : i + 4]) for i in range(0, len(indices), 4)]


@torch.library.custom_op("unimlip::contrastive", mutates_args=())
def contrastive_op(
    features: list[torch.Tensor],
    indices: list[int],
    scale: torch.Tensor,
    launch: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the [K] losses, the [2K, B] row log-sum-exps, d loss / d scale [K]); ``indices``: (r1, r2, c1, c2) per loss,
    flat, into ``features``; ``launch``: the fields of a :class:`Launch`."""
    losses, features = _losses_of(indices), [_aligned(f) for f in features]
    scale32 = scale.detach().float().reshape(1).contiguous()
    lse, loss_rows, dscale_rows = contrastive_forward(features, losses, scale32, Launch.from_fields(launch))
    half_mean = 0.5 / features[losses[0][0]].shape[0]
    return (
        loss_rows.view(len(losses), -1).sum(dim=1) * half_mean,
        lse,
        dscale_rows.view(len(losses), -1).sum(dim=1) * half_mean,
    )


@contrastive_op.register_fake
def _contrastive_shapes(features, indices, scale, launch):
    k, b = len(indices) // 4, features[indices[0]].shape[0]
    like = features[0]
    return (
        like.new_empty(k, dtype=torch.float32),
        like.new_empty(2 * k, b, dtype=torch.float32),
        like.new_empty(k, dtype=torch.float32),
    )


@torch.library.custom_op("unimlip::contrastive_backward", mutates_args=())
def contrastive_backward_op(
    features: list[torch.Tensor],
    indices: list[int],
    scale: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    launch: list[int],
) -> list[torch.Tensor]:
    """The gradient of every feature (each is read by some loss) for the losses' gradient ``grad`` [K]."""
    scale32 = scale.detach().float().reshape(1).contiguous()
    losses, grad32 = _losses_of(indices), grad.float().contiguous()
    aligned = [_aligned(f) for f in features]
    return contrastive_backward(aligned, losses, scale32, lse, grad32, Launch.from_fields(launch))


@contrastive_backward_op.register_fake
def _contrastive_backward_shapes(features, indices, scale, lse, grad, launch):
    return [torch.empty_like(f) for f in features]


def _save_for_contrastive_backward(ctx, inputs, output) -> None:
    features, indices, scale, launch = inputs
    _, lse, dscale_unit = output
    ctx.save_for_backward(scale, lse, dscale_unit, *features)
    ctx.args = (indices, launch)


def _contrastive_autograd(ctx, grad_losses, _grad_lse, _grad_dscale):
    scale, lse, dscale_unit, *features = ctx.saved_tensors
    indices, launch = ctx.args
    grads = contrastive_backward_op(features, indices, scale, lse, grad_losses, launch)
    dscale = (grad_losses.float() * dscale_unit).sum().reshape(scale.shape).to(scale.dtype)
    return list(grads), None, dscale, None


contrastive_op.register_autograd(_contrastive_autograd, setup_context=_save_for_contrastive_backward)


def contrastive_losses(
    losses, scale, row_offset: int = 0, self_terms: bool = False, blocks: Blocks | None = None
) -> torch.Tensor:
    """[K] fp32 losses, one per (r1, r2, c1, c2) in ``losses`` (see the module doc). Rows are
    [B, D], columns [N, D]; a tensor object given several times is read in place and gets one
    gradient, summed over its uses."""
    distinct: list[torch.Tensor] = []
    indices = []
    for loss in losses:
        indices.append(tuple(_index_of(t, distinct) for t in loss))
    (b, d), n = losses[0][0].shape, losses[0][2].shape[0]
    for r1, r2, c1, c2 in indices:
        assert distinct[r1].shape == distinct[r2].shape == (b, d), "rows must all be [B, D]"
        assert distinct[c1].shape == distinct[c2].shape == (n, d), "columns must all be [N, D]"
    assert n * d < 2**31, "int32 offsets"
    if not 0 <= row_offset <= n - b:
        raise ValueError(f"rows {row_offset}..{row_offset + b} are not among the {n} columns")
    dtype = distinct[0].dtype
    for t in distinct[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    features = [t.to(dtype).contiguous() for t in distinct]
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), device=features[0].device)
    launch = Launch(row_offset, self_terms, blocks or default_blocks(d, dtype, self_terms))
    return contrastive_op(features, [i for loss in indices for i in loss], scale, launch.fields())[0]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, copied if its address is not a multiple of 16 bytes (a view at an odd offset). Inside the
    ops, where tensors are real: an address read outside them would break a ``torch.compile`` graph."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _index_of(t: torch.Tensor, distinct: list[torch.Tensor]) -> int:
    for i, seen in enumerate(distinct):
        if seen is t:
            return i
    distinct.append(t)
    return len(distinct) - 1


# --- the ops the objective calls, with the references' signatures ------------------------------------
def infonce_triton(img, txt, scale, img_all=None, txt_all=None, row_offset: int = 0):
    """Fused ``infonce_reference``: same arguments, same value, gradients for every input."""
    img_all = img if img_all is None else img_all
    txt_all = txt if txt_all is None else txt_all
    return contrastive_losses([(img, txt, img_all, txt_all)], scale, row_offset)[0]


def ntxent_triton(
    za,
    zb,
    tau: float,
    za_all=None,
    zb_all=None,
    row_offset: int = 0,
    negatives: str = "cross-view",
):
    """Fused ``ntxent_reference``: same arguments, same value, gradients for every input.
    ``cross-view`` (the paper's Eq. 2) is InfoNCE between the views at scale 1 / tau: the same
    kernels without the self terms; ``all`` adds each side's own views (itself excluded)."""
    check_negatives(negatives)
    za_all = za if za_all is None else za_all
    zb_all = zb if zb_all is None else zb_all
    scale = torch.full((1,), 1.0 / tau, device=za.device)
    return contrastive_losses([(za, zb, za_all, zb_all)], scale, row_offset, self_terms=negatives == "all")[0]


def itc_terms_triton(imgs, txts, scale, imgs_all=None, txts_all=None, row_offset: int = 0) -> torch.Tensor:
    """Fused ``itc_terms_reference``: K InfoNCE terms in the same three launches. Features shared
    by several terms (the same tensor objects) are read in place by all of them, and each gets
    one gradient, accumulated in one program per tile over every term that reads it."""
    imgs_all = imgs if imgs_all is None else imgs_all
    txts_all = txts if txts_all is None else txts_all
    return contrastive_losses(list(zip(imgs, txts, imgs_all, txts_all)), scale, row_offset)
