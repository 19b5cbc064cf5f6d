"""`python -m dsdtune.study`: run a study file as Ray Tune trials (see `cli`).

plan (arms, seeds, shared prefixes; no Ray) -> validate (every check before Ray) -> run (the Ray
stages) -> results (the result files) -> the report. Only `run` imports Ray.
"""
from __future__ import annotations

from .cli import main
from .plan import Arm, Plan, describe_plan, make_plan, plan_for_arms

__all__ = ["main", "Arm", "Plan", "describe_plan", "make_plan", "plan_for_arms"]
