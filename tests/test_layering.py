"""The package's dependency flow runs one way: network <- training/planning <- nnU-Net entry points <- commands
<- the benchmark (whose SSL benefit run reuses the demo's stages).

Read from the source (``ast``), imports inside functions included, so a stray import upward fails here
instead of becoming a cycle later.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: package directories outside nnunet_logonet/ that setup.cfg installs into it
MAPPED = {"trainers": REPO / "trainers", "planners": REPO / "planners"}
#: each area's rank; a module may import modules of its own rank or below
RANK = {
    "network": 0, "ssl": 0, "phantom": 0, "figures": 0, "machine": 0, "workfolders": 0, "nifti": 0, "counting": 0,
    "": 0,
    "planning": 1, "training": 1,
    "trainers": 2, "planners": 2,
    "msd": 3, "env": 3, "demo": 3,
    "benchmark": 4,
}
#: commands that live beside the pieces they drive (console scripts and ``python -m`` modules)
COMMANDS = {
    "nnunet_logonet.planning.cli": 3,  # logonet_plan_and_preprocess
    "nnunet_logonet.phantom.cli": 3,  # logonet_phantom
    "nnunet_logonet.ssl.pipeline": 3,  # python -m nnunet_logonet.ssl.pipeline
    "nnunet_logonet.ssl.unlabeled": 3,  # logonet_prepare_unlabeled
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
    """Our modules ``module`` imports; ``from package import submodule`` names the submodule."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                source = node.module
            else:
                continue
            submodules = {f"{source}.{alias.name}" for alias in node.names} & set(MODULES)
            targets.update(submodules or {source})
            if len(submodules) < len(node.names):
                targets.add(source)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    return {t for t in targets if t == "nnunet_logonet" or t.startswith("nnunet_logonet.")}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(module: str) -> int:
    for command, rank in COMMANDS.items():
        if module == command or module.startswith(command + "."):
            return rank
    return RANK[_area(module)]


MODULES = _modules()


def test_every_area_has_a_rank():
    assert {_area(m) for m in MODULES} <= set(RANK), "give the new area a rank in RANK"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_downward(module):
    upward = sorted(t for t in _imports(module, MODULES[module]) if _rank(t) > _rank(module))
    assert not upward, f"{module} imports {upward} from a higher layer"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def _import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, without a package's own re-exports of its submodules (its
    ``__init__`` importing them is how a package is made, not a dependency between concepts)."""
    graph = {}
    for module, path in MODULES.items():
        targets = _imports(module, path) & set(MODULES)
        if path.name == "__init__.py":
            targets = {t for t in targets if not t.startswith(module + ".")}
        graph[module] = targets - {module}
    return graph


def test_no_two_modules_import_each_other_even_through_others():
    """Within one layer a cycle passes the rank check; it still ties two concepts together."""
    assert _cycles(_import_graph()) == []


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
    """The check can fail: imports of training and benchmark modules from the network are found, by
    submodule (``from nnunet_logonet import trainers`` once passed as an import of the package's root)."""
    path = tmp_path / "bad.py"
    path.write_text("from nnunet_logonet.training import trainer\nfrom ..benchmark import models\n"
                    "def later():\n    from nnunet_logonet import trainers, __version__\n")
    found = _imports("nnunet_logonet.network.bad", path)
    assert found == {"nnunet_logonet.training.trainer", "nnunet_logonet.benchmark.models", "nnunet_logonet.trainers",
                     "nnunet_logonet"}
    assert all(_rank(t) > _rank("nnunet_logonet.network.bad") for t in found - {"nnunet_logonet"})


def test_the_cycle_check_finds_a_cycle_through_a_third_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("script", sorted((REPO / ".ci").glob("*.py")), ids=lambda p: p.name)
def test_ci_scripts_import_names_that_exist(script):
    """The GPU check's scripts run only where a GPU is lent, and their output is piped: a name moved in the
    package (``make_train_step`` left ``benchmark.efficiency``) failed there unseen."""
    import importlib

    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "nnunet_logonet":
            module = importlib.import_module(node.module)
            missing = [alias.name for alias in node.names if not hasattr(module, alias.name)
                       and f"{node.module}.{alias.name}" not in MODULES]
            assert not missing, f"{script.name}: {node.module} has no {missing}"
