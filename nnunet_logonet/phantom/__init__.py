"""Built-in synthetic abdominal CT dataset (``logonet_phantom``)."""

from nnunet_logonet.phantom.anatomy import LABELS, MAX_SIZE, MIN_SIZE, PhantomCase, generate_case
from nnunet_logonet.phantom.writer import (
    PhantomArgumentError,
    case_identifier,
    case_seed,
    dataset_folder_name,
    write_dataset,
)

__all__ = [
    "LABELS", "MAX_SIZE", "MIN_SIZE", "PhantomArgumentError", "PhantomCase", "case_identifier",
    "case_seed", "dataset_folder_name", "generate_case", "write_dataset",
]
