"""Fused InfoNCE and NT-Xent against the plain-PyTorch references, forward and every gradient.

Each output is compared with the reference evaluated in float64 on the same (rounded) inputs. The
kernel may be off by at most twice PyTorch's own error in the input dtype, plus a small floor for
fp32 summation order ("twice PyTorch's error", as flash-attention's tests).
On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unimlip_fast.kernels.infonce import infonce_reference, itc_terms_reference
from unimlip_fast.kernels.ntxent import SIMCLR_NEGATIVES, ntxent_reference

triton_ops = pytest.importorskip("unimlip_fast.kernels.contrastive_triton", reason="triton is not installed")
pytestmark = [pytest.mark.usefixtures("one_blas_thread"), pytest.mark.interpreter]

DTYPES = [torch.float32, torch.bfloat16]


def _cases(strength: list[float]) -> list:
    """(B, D, strength, dtype): every combination on small shapes; the two large shapes (B past 12
    GPU row blocks, D of the ITC embedding) on two of them, to keep the interpreter under a minute."""
    small = [(1, 5), (7, 64), (130, 5)]
    full = [(b, d, s, t) for b, d in small for s in strength for t in DTYPES]
    large = [
        (b, d, s, t)
        for b, d in [(130, 768), (769, 64)]
        for s, t in [(strength[1], torch.float32), (strength[0], torch.bfloat16)]
    ]
    return [pytest.param(*case, id=f"B{case[0]}-D{case[1]}-{case[2]:g}-{str(case[3])[6:]}") for case in full + large]


def _unit_rows(b: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).to(dtype)


def _value_and_grads(fn, inputs: list[torch.Tensor], cast: torch.dtype | None = None) -> list[torch.Tensor]:
    leaves = [(x if cast is None else x.to(cast)).detach().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def assert_close_to_fp64(kernel, reference, inputs, floor: float) -> None:
    """kernel vs reference: both against the reference in float64 on the same inputs."""
    ours = _value_and_grads(kernel, inputs)
    torchs = _value_and_grads(reference, inputs)
    exact = _value_and_grads(reference, inputs, cast=torch.float64)
    names = ["loss"] + [f"grad[{i}]" for i in range(len(inputs))]
    for name, o, t, e in zip(names, ours, torchs, exact):
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype}, reference {t.dtype}"
        assert torch.isfinite(o).all(), name
        err, torch_err = (o.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        bound = 2 * torch_err + floor * max(1.0, e.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (PyTorch's own error {torch_err:.3g})"


# Relative to the largest exact value. bf16 gets one bf16 step more than PyTorch: the kernel feeds the
# softmax probabilities to the bf16 tensor-core product in bf16 (as flash-attention does, and as the
# interpreter emulates), where the reference keeps everything in fp32 until the gradient's rounding.
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("b,d,scale,dtype", _cases([1.0, 100.0]))
def test_infonce_matches_reference(b, d, scale, dtype):
    img, txt = _unit_rows(b, d, dtype, 0), _unit_rows(b, d, dtype, 1)
    # Nearly-aligned pairs make the scale-100 case peaked (a loss near 0), the hard one for exp.
    txt = F.normalize(txt.double() * 0.3 + img.double(), dim=-1).to(dtype)
    logit_scale = torch.tensor([scale])
    assert_close_to_fp64(triton_ops.infonce_triton, infonce_reference, [img, txt, logit_scale], FLOOR[dtype])


@pytest.mark.parametrize("negatives", SIMCLR_NEGATIVES)
@pytest.mark.parametrize("b,d,tau,dtype", _cases([1.0, 0.01]))
def test_ntxent_matches_reference(b, d, tau, dtype, negatives):
    za, zb = _unit_rows(b, d, dtype, 2), _unit_rows(b, d, dtype, 3)
    kernel = lambda a, b_: triton_ops.ntxent_triton(a, b_, tau, negatives=negatives)
    reference = lambda a, b_: ntxent_reference(a, b_, tau, negatives=negatives)
    assert_close_to_fp64(kernel, reference, [za, zb], FLOOR[dtype])


def test_cross_view_ntxent_is_infonce_between_the_views():
    """The paper's Eq. 2, written out in float64 (each view against the N views of the other side),
    is symmetric InfoNCE between the two views at scale 1 / tau, and is what both implementations
    compute; ``all`` (2N - 1 candidates) is a different loss."""
    world, b, d, tau = 2, 5, 8, 0.3
    za, zb = _unit_rows(world * b, d, torch.float64, 40), _unit_rows(world * b, d, torch.float64, 41)
    rows = slice(b, 2 * b)  # rank 1: local rows against the gathered columns
    sims = za[rows] @ zb.T / tau  # [B, N]: a_i . b_k
    sims_t = zb[rows] @ za.T / tau  # [B, N]: b_i . a_k
    positives = torch.arange(b) + b
    eq2 = 0.5 * (
        (sims.logsumexp(1) - sims[torch.arange(b), positives]).mean()
        + (sims_t.logsumexp(1) - sims_t[torch.arange(b), positives]).mean()
    )
    as_infonce = infonce_reference(za[rows], zb[rows], torch.tensor([1 / tau], dtype=torch.float64), za, zb, b)
    reference = ntxent_reference(za[rows], zb[rows], tau, za, zb, b, negatives="cross-view")
    kernel = triton_ops.ntxent_triton(
        za[rows].float(), zb[rows].float(), tau, za.float(), zb.float(), b, negatives="cross-view"
    )
    torch.testing.assert_close(as_infonce, eq2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference, eq2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernel.double(), eq2, rtol=1e-5, atol=1e-6)
    slip = ntxent_reference(za[rows], zb[rows], tau, za, zb, b, negatives="all")
    assert abs(slip.item() - eq2.item()) > 1e-3


def test_unknown_negatives_are_refused():
    za = _unit_rows(3, 4, torch.float32, 42)
    for fn in (ntxent_reference, triton_ops.ntxent_triton):
        with pytest.raises(ValueError, match="simclr_negatives"):
            fn(za, za, 0.1, negatives="same-view")


def test_ntxent_masks_the_self_similarity():
    """A view identical to its own column must not count itself: with the diagonal masked the
    loss of two identical, orthogonal pairs is finite and equals the hand-computed value."""
    za = torch.eye(4, 8)[:2]
    zb = torch.eye(4, 8)[2:]
    tau = 0.5
    loss = triton_ops.ntxent_triton(za, zb, tau, negatives="all")
    # Each row sees its partner (cosine 0), the other view's pair (0, 0), its own side's other
    # row (0); self excluded: lse over 3 zeros. With the self term in, a 1/tau logit would dominate.
    assert loss.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert loss.item() == pytest.approx(ntxent_reference(za, zb, tau, negatives="all").item(), abs=1e-6)
    # Cross-view (the paper's Eq. 2): the other side's two views only, lse over 2 zeros.
    cross = triton_ops.ntxent_triton(za, zb, tau)
    assert cross.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert cross.item() == pytest.approx(ntxent_reference(za, zb, tau).item(), abs=1e-6)


@pytest.mark.parametrize("op", ["infonce", "ntxent", "ntxent-all"])
def test_small_tiles_cover_every_loop(op):
    """16-wide tiles: many row, column, reduction and output-feature blocks, all of them ragged."""
    blocks = triton_ops.Blocks(m=16, n=16, k=16, d=16)
    x, y = _unit_rows(37, 40, torch.float32, 4), _unit_rows(37, 40, torch.float32, 5)
    if op == "infonce":
        kernel = lambda a, b, s: triton_ops.contrastive_losses([(a, b, a, b)], s, blocks=blocks)[0]
        inputs, reference = [x, y, torch.tensor([30.0])], infonce_reference
    else:
        negatives = "all" if op == "ntxent-all" else "cross-view"
        self_terms = negatives == "all"
        kernel = lambda a, b: triton_ops.contrastive_losses([(a, b, a, b)], 10.0, 0, self_terms, blocks)[0]
        inputs, reference = [x, y], lambda a, b: ntxent_reference(a, b, 0.1, negatives=negatives)
    assert_close_to_fp64(kernel, reference, inputs, FLOOR[torch.float32])


@pytest.mark.parametrize("op", ["infonce", "ntxent", "ntxent-all"])
def test_local_rows_against_gathered_columns(op):
    """Each rank's loss over its rows against all columns, as the objective calls it, has the
    reference's value and gradients for rows and columns separately (row_offset > 0)."""
    world, b, d = 3, 11, 24
    x, y = _unit_rows(world * b, d, torch.float32, 6), _unit_rows(world * b, d, torch.float32, 7)
    ops = {
        "infonce": (triton_ops.infonce_triton, infonce_reference, torch.tensor([20.0])),
        "ntxent": (triton_ops.ntxent_triton, ntxent_reference, 0.2),
        "ntxent-all": (
            lambda *a: triton_ops.ntxent_triton(*a, negatives="all"),
            lambda *a: ntxent_reference(*a, negatives="all"),
            0.2,
        ),
    }
    kernel, reference, scale = ops[op]
    for rank in range(world):
        rows = slice(rank * b, (rank + 1) * b)
        leaves = lambda rows=rows: [t.clone().requires_grad_() for t in (x[rows], y[rows], x, y)]
        results = []
        for fn in (kernel, reference):
            xr, yr, xa, ya = leaves()
            loss = fn(xr, yr, scale, xa, ya, rank * b)
            results.append([loss, *torch.autograd.grad(loss, [xr, yr, xa, ya])])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_scale_gradient_flows_through_a_learnable_parameter():
    """The objective passes logit_scale.exp(): the kernel's dscale reaches the parameter."""
    img, txt = _unit_rows(9, 16, torch.float32, 8), _unit_rows(9, 16, torch.float32, 9)
    grads = []
    for fn in (triton_ops.infonce_triton, infonce_reference):
        log_scale = torch.tensor(2.5, requires_grad=True)
        fn(img, txt, log_scale.exp()).backward()
        grads.append(log_scale.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_itc_terms_share_features_and_match_three_infonce_calls(dtype):
    """The objective's three ITC terms, (img, txt), (img_fp, txt), (img, txt_fp), as one rank of
    two sees them: shared tensors, local rows against gathered columns."""
    world, b, d = 2, 19, 48
    img, img_fp, txt, txt_fp = (_unit_rows(world * b, d, dtype, 10 + i) for i in range(4))
    rank = 1
    weights = torch.tensor([0.3, 0.5, 0.7])

    def weighted(itc_terms):
        def loss(img_all, img_fp_all, txt_all, txt_fp_all, scale):
            local = [t[rank * b : (rank + 1) * b] for t in (img_all, img_fp_all, txt_all, txt_fp_all)]
            li, lif, lt, ltf = local
            losses = itc_terms(
                [li, lif, li],
                [lt, lt, ltf],
                scale,
                [img_all, img_fp_all, img_all],
                [txt_all, txt_all, txt_fp_all],
                rank * b,
            )
            assert losses.shape == (3,)
            return (losses * weights).sum()

        return loss

    assert_close_to_fp64(
        weighted(triton_ops.itc_terms_triton),
        weighted(itc_terms_reference),
        [img, img_fp, txt, txt_fp, torch.tensor([50.0])],
        FLOOR[dtype],
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled kernels, bf16 tensor cores)")
@pytest.mark.parametrize("op", ["infonce", "ntxent", "itc_terms"])
@pytest.mark.parametrize("b", [1536, 4099])
def test_matches_reference_on_gpu(op, b):
    d = 256 if op == "ntxent" else 768
    x, y, z = (_unit_rows(b, d, torch.bfloat16, 20 + i).cuda() for i in range(3))
    scale = torch.tensor([100.0], device="cuda")
    if op == "infonce":
        kernel, reference, inputs = triton_ops.infonce_triton, infonce_reference, [x, y, scale]
    elif op == "ntxent":
        kernel = lambda a, b_: triton_ops.ntxent_triton(a, b_, 0.05)
        reference, inputs = (lambda a, b_: ntxent_reference(a, b_, 0.05)), [x, y]
    else:
        kernel = lambda i, t, tf, s: triton_ops.itc_terms_triton([i, i], [t, tf], s).sum()
        reference = lambda i, t, tf, s: itc_terms_reference([i, i], [t, tf], s).sum()
        inputs = [x, y, z, scale]
    assert_close_to_fp64(kernel, reference, inputs, FLOOR[torch.bfloat16])


def test_features_at_an_unaligned_address():
    """The kernels assume 16-byte aligned features; a view at an odd offset is copied first."""
    b, d = 6, 8
    storage = torch.cat([torch.zeros(1), _unit_rows(b, d, torch.float32, 30).flatten()])
    img = storage[1:].view(b, d)  # 4 bytes past an aligned address
    txt = _unit_rows(b, d, torch.float32, 31)
    assert img.data_ptr() % 16 != 0
    assert_close_to_fp64(
        triton_ops.infonce_triton, infonce_reference, [img, txt, torch.tensor([10.0])], FLOOR[torch.float32]
    )
