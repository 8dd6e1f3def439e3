"""Every Triton kernel compiles for Hopper (sm_90a) down to a cubin, with no GPU present.

The interpreter runs the kernels' logic on CPU but never lowers them; this catches what only the
compiler rejects (dot shapes, layouts, types) on a machine without a device. The compiles run in
one child process, since this test session runs triton in interpreter mode. Needs triton's CUDA
backend (it ships ptxas); the first run takes ~40 s, later ones hit triton's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = pytest.mark.slow

CONTRASTIVE = [
    (kernel, self_terms, dtype)
    for kernel in ("fwd", "bwd_rows", "bwd_cols")
    for self_terms in (False, True)
    for dtype in ("bf16", "fp32")
    if not (dtype == "fp32" and self_terms)
]  # the slowest compile (20 s), same code as the rest
DROPBLOCK = ["count", "apply"]
DROPBLOCK_MAPS = [(7, 7, 3), (32, 32, 7)]  # ResNet's last map; the largest the kernel takes


def _compile(fn, pointer_types, scalar_types, constexprs, num_warps, must_contain=""):
    """Compile ``fn`` for sm_90a as triton would launch it with D = 768 (divisible by 16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = scalar_types.get(name) or pointer_types.get(name, pointer_types["*"])
    attrs = {(fn.arg_names.index("D"),): [["tt.divisibility", 16]]} if "D" in fn.arg_names else {}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
    assert must_contain in compiled.asm["ptx"], f"no {must_contain} in the PTX"


def compile_all_cases() -> dict[str, str]:
    """In the child: compile every case, -> {case: "ok" or the error}."""
    import torch

    from unimlip_fast.kernels import contrastive_triton as ct
    from unimlip_fast.kernels import dropblock_triton as dbt

    results = {}
    for kernel, self_terms, dtype in CONTRASTIVE:
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        blocks = ct.default_blocks(768, torch_dtype, self_terms)
        constexprs = dict(
            DTYPE=ct.TL_DTYPES[torch_dtype],
            SELF_TERMS=self_terms,
            UPCAST=False,
            PRECISION="tf32x3" if dtype == "fp32" else "tf32",
            BLOCK_M=blocks.m,
            BLOCK_N=blocks.n,
            BLOCK_K=blocks.k,
        )
        if kernel != "fwd":
            constexprs["BLOCK_D"] = blocks.d
        pointers = {"*": "*fp32", "table_ptr": "*i64", "out_ptr": "*i64", "use_ptr": "*i64"}
        scalars = {name: "i32" for name in ("B", "N", "D", "row_offset")}
        results[f"{kernel}-{self_terms}-{dtype}"] = _try(
            _compile,
            ct.JIT_KERNELS[kernel],
            pointers,
            scalars,
            constexprs,
            blocks.warps,
            # Asynchronous, vectorised copies: the features' addresses come from tables, and without
            # the alignment hint the loads fall back to one 2-byte load per element.
            "cp.async" if dtype == "bf16" else "",
        )
    for mode in DROPBLOCK:
        for height, width, block in DROPBLOCK_MAPS:
            layout, warps = dbt.launch_layout(height, width, block)
            constexprs = dict(BLOCK=block, APPLY=mode == "apply", DOT_DTYPE=dbt.tl.float16, **layout)
            scalars = {
                "seed": "i32",
                "offset": "i32",
                "P": "i32",
                "H": "i32",
                "W": "i32",
                "gamma": "fp32",
                "numel": "fp32",
            }
            results[f"dropblock-{mode}-{height}x{width}"] = _try(
                _compile, dbt.JIT_KERNELS["dropblock"], {"*": "*bf16", "kept_ptr": "*i32"}, scalars, constexprs, warps
            )
    return results


def _try(fn, *args) -> str:
    try:
        fn(*args)
        return "ok"
    except Exception as err:  # noqa: BLE001 - reported by the test that owns the case
        return f"{type(err).__name__}: {err}"


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = "import json, tests.test_kernels_compile as t; print(json.dumps(t.compile_all_cases()))"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    if "No module named 'triton.backends.nvidia'" in run.stderr:
        pytest.skip("triton has no CUDA backend here")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [f"{k}-{s}-{d}" for k, s, d in CONTRASTIVE])
def test_contrastive_kernels_compile_for_hopper(compiled, case):
    assert compiled[case] == "ok", compiled[case]


@pytest.mark.parametrize("case", [f"{mode}-{h}x{w}" for mode in DROPBLOCK for h, w, _ in DROPBLOCK_MAPS])
def test_dropblock_kernel_compiles_for_hopper(compiled, case):
    assert compiled[f"dropblock-{case}"] == "ok", compiled[f"dropblock-{case}"]
