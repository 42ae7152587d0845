"""Medical Segmentation Decathlon: validate test-set predictions and pack a submission archive.

``validate_task`` checks one task's predictions; ``write_submission`` packs one or more tasks;
``logonet_msd_submission`` is the command (see ``docs/msd.md``).
"""

from nnunet_logonet.msd.submission import IncompleteSubmissionError, write_submission
from nnunet_logonet.msd.validation import CaseResult, TaskReport, validate_task

__all__ = ["CaseResult", "IncompleteSubmissionError", "TaskReport", "validate_task",
           "write_submission"]
