"""Medical Segmentation Decathlon: validate test-set predictions and pack a submission archive.

``validate_task`` checks one task's predictions; ``write_submission`` packs one or more tasks;
``logonet_msd_submission`` is the command (see ``docs/msd.md``). The names are imported on first use,
so ``python -m nnunet_logonet.msd.submission`` runs its module once (runpy warned when this package
had imported it already).
"""

import importlib

__all__ = ["CaseResult", "IncompleteSubmissionError", "TaskReport", "validate_task",
           "write_submission"]

_MODULE_OF = {"IncompleteSubmissionError": "submission", "write_submission": "submission",
              "CaseResult": "validation", "TaskReport": "validation", "validate_task": "validation"}


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
