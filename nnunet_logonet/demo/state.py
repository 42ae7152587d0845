"""``<base>/demo_state.json``: which stages finished, with which settings, at what cost.

A stage counts as finished only when it is recorded here *and* its outputs still exist, so a
re-run repeats exactly the stages that did not finish (or whose outputs were deleted).

Each dataset folder the demo makes in nnUNet_raw, _preprocessed and _results holds a ``.logonet_demo``
marker (:func:`mark`): ``--fresh`` deletes only marked folders, and a folder of the demo's name
without it (a user's own dataset) stops the demo before it writes anything.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from nnunet_logonet.demo.settings import DemoError, DemoSettings
from nnunet_logonet.workfolders import write_json_whole

__all__ = ["MARKER", "STATE_FILE", "DemoState", "is_marked", "mark"]

STATE_FILE = "demo_state.json"
STATE_VERSION = 1
MARKER = ".logonet_demo"


class DemoState:
    """The stage records of one ``--base`` (``demo_state.json``), saved after every change."""

    def __init__(self, path: Path, settings: DemoSettings, stages: dict | None = None) -> None:
        self.path = Path(path)
        self.settings = settings
        self.stages: dict[str, dict] = stages or {}

    @classmethod
    def open(cls, base: Path, settings: DemoSettings) -> "DemoState":
        """The state of ``base``; a :class:`DemoError` when it was made with other settings."""
        path = Path(base) / STATE_FILE
        if not path.is_file():
            return cls(path, settings)
        try:
            data = json.loads(path.read_text())
            recorded = data["settings"]
            stages = data["stages"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DemoError(f"{path} is unreadable ({error}). Re-run with --fresh to start over in {base}.") from error
        if data.get("digest") != settings.digest():
            changes = "; ".join(settings.differences(recorded)) or "the demo's code or version"
            raise DemoError(
                f"--base {base} holds a demo made with other settings ({changes}). Re-run with --fresh to "
                f"redo every stage there, or pass another --base to keep both (with nnUNet_raw, "
                f"nnUNet_preprocessed and nnUNet_results set, the datasets are shared between bases: also "
                f"choose another --dataset-id).")
        return cls(path, settings, stages)

    def finished(self, stage: str) -> dict | None:
        record = self.stages.get(stage)
        return record if record and record.get("digest") == self.settings.digest() else None

    def record(self, stage: str, **info) -> dict:
        """Record ``stage``'s status and figures; each record gets the next sequence number, so that a
        stage recorded after one that needs it makes that one stale, also across interrupted runs."""
        sequence = 1 + max((r.get("sequence", 0) for r in self.stages.values()), default=0)
        self.stages[stage] = {**info, "digest": self.settings.digest(), "sequence": sequence,
                              "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.save()
        return self.stages[stage]

    def redone_since(self, stage: str, needs: tuple[str, ...]) -> list[str]:
        """The stages among ``needs`` recorded (started or finished) after ``stage``'s own record."""
        own = self.stages.get(stage, {}).get("sequence", 0)
        return [need for need in needs if self.stages.get(need, {}).get("sequence", 0) > own]

    def save(self) -> None:
        data = {"version": STATE_VERSION, "digest": self.settings.digest(), "settings": self.settings.as_dict(),
                "stages": self.stages}
        write_json_whole(self.path, data)


def mark(folder: Path) -> Path:
    """Make ``folder`` (if needed) and record in it that the demo made it. nnU-Net finds datasets
    with ``subdirs(nnUNet_X, prefix="DatasetNNN")`` and opens named files inside them, so a dot-file
    there is invisible to it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    if not marker.is_file():
        marker.write_text("made by logonet_demo; `logonet_demo --fresh` deletes this folder\n")
    return folder


def is_marked(folder: Path) -> bool:
    """Whether ``folder`` holds the demo's marker, i.e. the demo made it (:func:`mark`)."""
    return (Path(folder) / MARKER).is_file()
