"""Model-state bytes per GPU by ZeRO stage and precision, as DeepSpeed holds them.

The accounting of the ZeRO paper (Rajbhandari et al. 2020, section 3): with bf16/fp16 weights,
2 bytes of weights and 2 of gradients per parameter, and fp32 master weights (4) and AdamW's two
moments (4 + 4) in the optimizer; with fp32 weights (plain or under torch autocast) 4 + 4 and the
moments, no master copy. Stage 1 partitions the optimizer states over the ranks, stage 2 also the
gradients, stage 3 also the weights. Frozen parameters keep only their weights. DeepSpeed's
stages 1-2 add their gradient buckets: ``reduce_bucket_size`` elements, twice with ``overlap_comm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # reduce_bucket_size's default, in elements


@dataclass(frozen=True)
class ModelStates:
    weights: float
    gradients: float
    master: float
    moments: float
    buckets: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.master + self.moments + self.buckets

    def as_dict(self) -> dict[str, float]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "fp32_master": self.master,
            "adamw_moments": self.moments,
            "gradient_buckets": self.buckets,
            "total": self.total,
        }


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_states(trainable: int, frozen: int, precision: str, ds: dict[str, Any], world_size: int) -> ModelStates:
    """Bytes per GPU for ``trainable`` + ``frozen`` parameters; ``precision`` as ``ds_config.precision_of``."""
    stage = zero_stage(ds)
    half = precision in ("bf16", "fp16")
    weight_bytes = 2 if half else 4
    share = {k: (1 / world_size if stage >= level else 1.0) for k, level in (("opt", 1), ("grad", 2), ("w", 3))}
    weights = (trainable + frozen) * weight_bytes * share["w"]
    gradients = trainable * weight_bytes * share["grad"]
    master = trainable * 4 * share["opt"] if half else 0.0
    moments = trainable * 8 * share["opt"]
    buckets = 0.0
    zero = ds.get("zero_optimization", {})
    if stage in (1, 2) and zero.get("contiguous_gradients", True):
        elements = int(zero.get("reduce_bucket_size", DEEPSPEED_DEFAULT_BUCKET))  # allocated whole
        buckets = elements * weight_bytes * (2 if zero.get("overlap_comm", False) else 1)
    return ModelStates(weights, gradients, master, moments, buckets)
