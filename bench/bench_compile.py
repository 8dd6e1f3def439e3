"""Every Triton kernel compiled ahead of time for each card the project claims, with no device.

The matrix: the contrastive kernels (forward, rows and columns backward) and DropBlock's kernel,
for sm_80 (A100) and sm_90a (H100) in bf16 and fp32, and for sm_70 (V100, no bf16; the dots run on
FMA units) in fp16. Each program is lowered to a cubin with the launch's real constexprs (D = 768
for InfoNCE, 256 for NT-Xent; DropBlock on a 7x7 and a 32x32 map), its shared memory checked
against the card's limit per block, and its registers and spill bytes read from ptxas.

    python bench/bench_compile.py            # prints the table (markdown), exits 1 if any case fails

``tests/test_kernels_compile.py`` runs ``compile_matrix`` in a child process. The first run takes
minutes (ptxas); later ones hit triton's cache. The register report reruns ptxas per program, so
the test, which checks compiling and shared memory, leaves it to this script.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# Compiling needs the real backend, not the interpreter. Only when run as a script: the test imports
# this module (and sets the variable in its own child process), and must leave its session's value.
if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass(frozen=True)
class Card:
    name: str
    arch: int  # compute capability, major * 10 + minor
    shared_limit: int  # bytes of shared memory one block may use (opt-in maximum)
    dtypes: tuple[str, ...]


CARDS = (
    Card("V100", 70, 96 * 1024, ("fp16",)),
    Card("A100", 80, 164 * 1024, ("bf16", "fp32")),
    Card("H100", 90, 228 * 1024, ("bf16", "fp32")),
)

# (kernel, self_terms, dim): InfoNCE (no self terms) at the ITC width, NT-Xent at SimCLR's.
CONTRASTIVE = [
    (kernel, self_terms, 256 if self_terms else 768)
    for kernel in ("fwd", "bwd_rows", "bwd_cols")
    for self_terms in (False, True)
]
DROPBLOCK_MAPS = [(7, 7, 3), (32, 32, 7)]  # ResNet's last map; the largest the kernel takes


@dataclass(frozen=True)
class Case:
    kernel: str  # "fwd-infonce", "dropblock-apply-7x7", ...
    dtype: str
    card: Card

    @property
    def name(self) -> str:
        return f"{self.kernel}-{self.dtype}-sm_{self.card.arch}"


@dataclass
class Result:
    case: str
    kernel: str
    dtype: str
    arch: str
    shared: int = 0
    shared_limit: int = 0
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    error: str = ""


def cases() -> list[Case]:
    """The whole matrix. DropBlock's dot is fp16 whatever the feature dtype (0/1 operands, exact),
    and the feature dtype only changes its loads and stores: it is compiled in bf16 on sm_80/90 and
    fp16 on sm_70, not also in fp32 (the same program but for the element width)."""
    out = []
    for card in CARDS:
        for dtype in card.dtypes:
            for kernel, self_terms, _ in CONTRASTIVE:
                out.append(Case(f"{kernel}-{'ntxent' if self_terms else 'infonce'}", dtype, card))
            if dtype != "fp32":
                for mode in ("count", "apply"):
                    for h, w, _ in DROPBLOCK_MAPS:
                        out.append(Case(f"dropblock-{mode}-{h}x{w}", dtype, card))
    return out


def _ptxas_report(ptx: str, arch: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) as ptxas -v reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run(
            [get_ptxas(int(arch[3:5])).path, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = run.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def _compile(fn, pointer_types, scalar_types, constexprs, num_warps, card: Card, must_contain: str = ""):
    """Compile ``fn`` as triton would launch it with D divisible by 16; -> the compiled kernel."""
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
    compiled = triton.compile(src, target=GPUTarget("cuda", card.arch, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
    assert must_contain in compiled.asm["ptx"], f"no {must_contain} in the PTX"
    return compiled


def _compile_case(case: Case):
    import torch

    from unimlip_fast.kernels import contrastive_triton as ct
    from unimlip_fast.kernels import dropblock_triton as dbt

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.dtype]
    if case.kernel.startswith("dropblock"):
        _, mode, size = case.kernel.split("-")
        height, width, block = next(m for m in DROPBLOCK_MAPS if f"{m[0]}x{m[1]}" == size)
        layout, warps = dbt.launch_layout(height, width, block)
        constexprs = dict(BLOCK=block, APPLY=mode == "apply", DOT_DTYPE=dbt.tl.float16, **layout)
        scalars = {"seed": "i32", "offset": "i32", "P": "i32", "H": "i32", "W": "i32", "gamma": "fp32", "numel": "fp32"}
        pointers = {"*": f"*{case.dtype}", "kept_ptr": "*i32"}
        return _compile(dbt.JIT_KERNELS["dropblock"], pointers, scalars, constexprs, warps, case.card)
    kernel, loss = case.kernel.split("-")
    self_terms = loss == "ntxent"
    dim = next(d for k, s, d in CONTRASTIVE if k == kernel and s == self_terms)
    blocks = ct.default_blocks(dim, torch_dtype, self_terms)
    upcast, precision = ct.dot_flags(torch_dtype, divmod(case.card.arch, 10))
    constexprs = dict(
        DTYPE=ct.TL_DTYPES[torch_dtype],
        SELF_TERMS=self_terms,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_M=blocks.m,
        BLOCK_N=blocks.n,
        BLOCK_K=blocks.k,
    )
    if kernel != "fwd":
        constexprs["BLOCK_D"] = blocks.d
    pointers = {"*": "*fp32", "table_ptr": "*i64", "out_ptr": "*i64", "use_ptr": "*i64"}
    scalars = {name: "i32" for name in ("B", "N", "D", "row_offset")}
    # Asynchronous, vectorised copies from Ampere on: the features' addresses come from tables, and
    # without the alignment hint the loads fall back to one 2-byte load per element.
    must_contain = "cp.async" if case.dtype == "bf16" else ""
    return _compile(ct.JIT_KERNELS[kernel], pointers, scalars, constexprs, blocks.warps, case.card, must_contain)


def compile_one(case: Case, registers: bool = True) -> Result:
    """Compile ``case``; with ``registers``, also rerun ptxas on its PTX for its register report
    (triton's cache keeps the cubin but not that report)."""
    arch_name = "sm_90a" if case.card.arch == 90 else f"sm_{case.card.arch}"  # triton's target for Hopper
    result = Result(case.name, case.kernel, case.dtype, arch_name, shared_limit=case.card.shared_limit)
    try:
        compiled = _compile_case(case)
    except Exception as err:  # noqa: BLE001 - the failure is the case's result
        result.error = f"{type(err).__name__}: {str(err)[-2000:]}"
        return result
    result.shared = int(compiled.metadata.shared)
    if not registers:
        return result
    try:
        result.registers, result.spill_stores, result.spill_loads = _ptxas_report(compiled.asm["ptx"], arch_name)
    except (subprocess.CalledProcessError, AttributeError, ImportError) as err:
        result.error = f"ptxas report: {err}"
    return result


def compile_matrix(registers: bool = True) -> list[dict]:
    return [asdict(compile_one(case, registers)) for case in cases()]


def table(rows: list[dict]) -> str:
    import triton

    lines = [
        f"Compiled with triton {triton.__version__} for sm_70, sm_80 and sm_90a, no device needed; registers and"
        " spills from ptxas -v, shared memory from triton's metadata against the card's limit per block.",
        "",
        "| kernel | dtype | arch | shared bytes (limit) | registers | spill stores / loads (bytes) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['dtype']} | {r['arch']} | FAILED: {r['error'][:200]} | | |")
            continue
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['shared']} ({r['shared_limit']}) | "
            f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} |"
        )
    return "\n".join(lines)


def main() -> int:
    rows = compile_matrix()
    print(table(rows))
    return 1 if any(r["error"] or r["shared"] > r["shared_limit"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
