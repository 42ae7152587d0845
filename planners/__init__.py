"""Thin re-exports of the LoGoNet experiment planners (real code: :mod:`nnunet_logonet.planning`)."""
