"""What one demo run is: dataset, sizes, budget, models. Everything a finished stage depends on.

A demo's work folder (``--base``) records these settings; a later run with other settings must say
``--fresh`` (or use another ``--base``) instead of silently mixing results of two set-ups.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from nnunet_logonet.training.trainer import DEMO_BUDGET, DEMO_QUICK_BUDGET

__all__ = ["DATASET_NAME", "DEVICES", "PRESETS", "DemoError", "DemoSettings", "ModelRun", "SSL_DATASET_NAME",
           "make_settings"]

DATASET_NAME = "Phantom"
SSL_DATASET_NAME = "PhantomSSL"
DEVICES = ("auto", "cpu", "cuda")
#: preset -> (planner given to logonet_plan_and_preprocess, plans identifier it writes)
PRESETS = {"tiny": ("LoGoNetTinyPlanner", "LoGoNetTinyPlans"),
           "S": ("LoGoNetPlanner", "LoGoNetPlans"),
           "L": ("LoGoNetLPlanner", "LoGoNetLPlans")}
#: phantom cases and in-plane size (voxels). Size 48 keeps nnU-Net's default U-Net at ~1 s per
#: iteration on 2 CPU cores (patch 28x48x48); --quick uses 32 (patch 16x32x32).
CASES = {False: {"num_train": 20, "num_test": 5, "num_unlabeled": 10, "size": 48},
         True: {"num_train": 8, "num_test": 2, "num_unlabeled": 4, "size": 32}}
FOLD = "0"


class DemoError(RuntimeError):
    """The demo cannot go on; the message names the flag, folder or log and what to do."""


@dataclass(frozen=True)
class ModelRun:
    """One trained model of the comparison: nnU-Net trainer + plans (+ pretrained weights)."""

    key: str
    label: str
    trainer: str
    plans: str
    pretrained: bool = False


@dataclass(frozen=True)
class DemoSettings:
    """The settings of one demo run (their digest decides whether a recorded stage still applies);
    the properties derive nnU-Net's dataset, plans and trainer names from them."""

    dataset_id: int
    seed: int
    device: str
    preset: str
    quick: bool
    num_train: int
    num_test: int
    num_unlabeled: int
    size: int
    budget: dict = field(hash=False)
    tta: bool = False

    # ------------------------------------------------------------------------- names
    @property
    def dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{DATASET_NAME}"

    @property
    def ssl_dataset_id(self) -> int:
        return self.dataset_id + 1

    @property
    def ssl_dataset(self) -> str:
        return f"Dataset{self.ssl_dataset_id:03d}_{SSL_DATASET_NAME}"

    @property
    def planner(self) -> str:
        return PRESETS[self.preset][0]

    @property
    def plans(self) -> str:
        return PRESETS[self.preset][1]

    @property
    def ssl_plans(self) -> str:
        """A copy of the LoGoNet plans under its own name, so the fine-tuned model gets its own
        results folder (same trainer and plans content as the from-scratch model)."""
        return self.plans.replace("Plans", "SSLPlans")

    @property
    def suffix(self) -> str:
        return "demoQuick" if self.quick else "demo"

    @property
    def ssl_trainer(self) -> str:
        return f"LoGoNetSSLTrainer_{self.suffix}"

    @property
    def models(self) -> tuple[ModelRun, ...]:
        name = f"LoGoNet-{self.preset}"
        return (
            ModelRun("nnunet", "nnU-Net (default U-Net)", f"nnUNetTrainer_{self.suffix}", "nnUNetPlans"),
            ModelRun("logonet", f"{name} (scratch)", f"LoGoNetTrainer_{self.suffix}", self.plans),
            ModelRun("logonet_ssl", f"{name} + SSL", f"LoGoNetTrainer_{self.suffix}", self.ssl_plans, True),
        )

    # ---------------------------------------------------------------------- identity
    def as_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        """sha256 of the settings (budget included): a changed budget in the code also counts."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, recorded: dict) -> list[str]:
        """``key: recorded -> now`` for every setting that differs from ``recorded``."""
        now = self.as_dict()
        keys = sorted(set(now) | set(recorded))
        return [f"{k}: {recorded.get(k)!r} -> {now.get(k)!r}" for k in keys if recorded.get(k) != now.get(k)]


def resolve_device(device: str, cuda_available: bool) -> str:
    """``auto`` -> cuda when available, else cpu; a :class:`DemoError` for an unknown device or cuda
    without CUDA."""
    if device not in DEVICES:
        raise DemoError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}.")
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise DemoError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False). "
                        "Use --device cpu (or auto).")
    return device


def make_settings(*, dataset_id: int = 900, seed: int = 0, device: str = "auto", preset: str | None = None,
                  quick: bool = False, cuda_available: bool = False) -> DemoSettings:
    """Validated settings; ``preset`` None means tiny on CPU, S on CUDA."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 998:
        raise DemoError(f"--dataset-id must be an integer in [1, 998] (the pretraining dataset takes id+1), "
                        f"got {dataset_id!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DemoError(f"--seed must be an integer >= 0, got {seed!r}.")
    device = resolve_device(device, cuda_available)
    if preset is None:
        preset = "S" if device == "cuda" else "tiny"
    if preset not in PRESETS:
        raise DemoError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}.")
    budget = dict(DEMO_QUICK_BUDGET if quick else DEMO_BUDGET)
    return DemoSettings(dataset_id=dataset_id, seed=seed, device=device, preset=preset, quick=quick,
                        budget=budget, tta=device == "cuda", **CASES[quick])
