"""Thin re-export of the LoGoNet experiment planners (run by ``logonet_plan_and_preprocess``)."""

from nnunet_logonet.planning.planners import (  # noqa: F401
    LoGoNetLPlanner,
    LoGoNetPlanner,
    LoGoNetTinyPlanner,
    ULKANetPlanner,
)
