"""The cards and links the planner knows: memory, dense matrix throughput, default link.

Figures are the vendors' datasheet numbers (dense, no sparsity). Memory is the nominal capacity in
GiB; the planner keeps a reserve out of it (``estimate.RESERVE_FRACTION``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    gbytes_per_s: float  # per GPU, per direction, as a ring collective sees it
    note: str


LINKS: dict[str, Link] = {
    "nvlink2": Link("nvlink2", 150.0, "V100 SXM2 NVLink (6 links x 25 GB/s per direction)"),
    "nvlink3": Link("nvlink3", 300.0, "A100 SXM NVLink 3 (12 links x 25 GB/s per direction)"),
    "nvlink4": Link("nvlink4", 450.0, "H100/H200 SXM NVLink 4 (18 links x 25 GB/s per direction)"),
    "pcie3": Link("pcie3", 12.0, "PCIe 3.0 x16, effective"),
    "pcie4": Link("pcie4", 25.0, "PCIe 4.0 x16, effective"),
    "pcie5": Link("pcie5", 50.0, "PCIe 5.0 x16, effective"),
    "ib-edr": Link("ib-edr", 12.5, "InfiniBand EDR, 100 Gb/s per GPU"),
    "ib-hdr": Link("ib-hdr", 25.0, "InfiniBand HDR, 200 Gb/s per GPU"),
    "ib-ndr": Link("ib-ndr", 50.0, "InfiniBand NDR, 400 Gb/s per GPU"),
}


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float
    half_tflops: float  # dense bf16 (fp16 where the card has no bf16) matrix throughput
    bf16: bool
    link: str  # the default key of LINKS between the GPUs of one node
    inter_node: str  # the default key of LINKS between nodes
    gpus_per_node: int = 8
    note: str = ""


CARDS: dict[str, Card] = {
    c.name: c
    for c in [
        Card("v100-16gb", 16, 125.0, False, "nvlink2", "ib-edr", note="SXM2; fp16 Tensor Cores, no bf16"),
        Card("v100-32gb", 32, 125.0, False, "nvlink2", "ib-edr", note="SXM2; fp16 Tensor Cores, no bf16"),
        Card("a100-40gb", 40, 312.0, True, "nvlink3", "ib-hdr", note="SXM4"),
        Card("a100-80gb", 80, 312.0, True, "nvlink3", "ib-hdr", note="SXM4"),
        Card("h100-80gb", 80, 989.0, True, "nvlink4", "ib-ndr", note="SXM5"),
        Card("h200", 141, 989.0, True, "nvlink4", "ib-ndr", note="SXM, 141 GB HBM3e"),
        Card("l40s", 48, 362.0, True, "pcie4", "ib-hdr", note="PCIe, no NVLink"),
        Card(
            "rtx-4090",
            24,
            82.6,
            True,
            "pcie4",
            "ib-hdr",
            gpus_per_node=4,
            note="PCIe, no NVLink; fp32-accumulate rate (GeForce halves it against fp16 accumulate)",
        ),
    ]
}


def find_card(name: str) -> Card:
    key = name.strip().lower().replace("_", "-")
    if key not in CARDS:
        raise ValueError(f"unknown card {name!r}; known: {', '.join(CARDS)}")
    return CARDS[key]


def find_link(name: str) -> Link:
    if name not in LINKS:
        raise ValueError(f"unknown link {name!r}; known: {', '.join(LINKS)}")
    return LINKS[name]
