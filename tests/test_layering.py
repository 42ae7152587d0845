"""The package's dependency flow runs one way: network <- training/planning <- nnU-Net entry points <- commands.

Read from the source (``ast``), so a stray import upward fails here instead of becoming a cycle later.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: package directories outside nnunet_logonet/ that setup.cfg installs into it
MAPPED = {"trainers": REPO / "trainers", "planners": REPO / "planners"}
#: each area's rank; a module may import our areas of its own rank or below
RANK = {
    "network": 0, "ssl": 0, "phantom": 0, "msd": 0, "figures": 0, "machine": 0, "env": 0, "workfolders": 0,
    "nifti": 0, "": 0,
    "planning": 1, "training": 1,
    "trainers": 2, "planners": 2,
    "benchmark": 3, "demo": 3,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in (REPO / "nnunet_logonet").rglob("*.py"):
        found[".".join(path.relative_to(REPO).with_suffix("").parts)] = path
    for name, folder in MAPPED.items():
        for path in folder.rglob("*.py"):
            found[".".join(("nnunet_logonet", name, *path.relative_to(folder).with_suffix("").parts))] = path
    return {name.removesuffix(".__init__"): path for name, path in found.items()}


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                targets.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                targets.add(node.module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t == "nnunet_logonet" or t.startswith("nnunet_logonet.")}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


MODULES = _modules()


def test_every_area_has_a_rank():
    assert {_area(m) for m in MODULES} <= set(RANK), "give the new area a rank in RANK"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_downward(module):
    upward = sorted(t for t in _imports(module, MODULES[module]) if RANK[_area(t)] > RANK[_area(module)])
    assert not upward, f"{module} imports {upward} from a higher layer"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _area(m) == "network"))
def test_the_network_imports_nothing_else_of_ours(module):
    """The network is plain PyTorch modules: nnU-Net builds it from plans, nothing else is needed."""
    outside = sorted(t for t in _imports(module, MODULES[module]) if _area(t) != "network")
    assert not outside, f"{module} imports {outside}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("nnunet_logonet.network.kernels.")))
def test_kernels_depend_only_on_the_lever_switches_and_each_other(module):
    """conv3d dispatches to the kernels, never the reverse."""
    allowed = ("nnunet_logonet.network.levers", "nnunet_logonet.network.kernels")
    other = sorted(t for t in _imports(module, MODULES[module]) if not t.startswith(allowed))
    assert not other, f"{module} imports {other}"


def test_the_reader_sees_a_real_upward_import(tmp_path):
    """The check can fail: an import of the training package from the network is found."""
    path = tmp_path / "bad.py"
    path.write_text("from nnunet_logonet.training import trainer\nfrom ..benchmark import models\n")
    found = _imports("nnunet_logonet.network.bad", path)
    assert found == {"nnunet_logonet.training", "nnunet_logonet.benchmark"}
    assert all(RANK[_area(t)] > RANK["network"] for t in found)
