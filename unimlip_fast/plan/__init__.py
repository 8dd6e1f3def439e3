"""``unimlip-fast plan``: will a recipe fit a card, at which micro-batch, how fast, with what traffic.

``trace``: one step traced with fake tensors (memory by kind at the peak, FLOPs); ``states``: model
states by ZeRO stage and precision; ``cards``: the cards and links; ``estimate``: the plan;
``report``: the tables.
"""

from __future__ import annotations

from .cards import CARDS, LINKS, find_card
from .estimate import DEFAULT_MFU, Assumptions, Plan, plan

__all__ = ["CARDS", "DEFAULT_MFU", "Assumptions", "LINKS", "Plan", "find_card", "plan"]
