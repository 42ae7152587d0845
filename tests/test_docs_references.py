"""The docs' concrete references (paths, modules, commands, flags, test names, symbols) still exist.

README.md and docs/**/*.md cite many files, ``python -m`` modules, console scripts with their flags,
test names and ``file.py::Symbol`` places. These tests parse the Markdown and check each one against
the tree, setup.cfg, the commands' argparse parsers and tests/, so that a rename or a dropped flag
fails here instead of leaving the docs quietly wrong. Every check lists all of its broken references
(doc:line) in one assertion message.

The parsing helpers take the Markdown text, so the last tests run them on synthetic text to show they
do catch a broken reference.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import functools
import importlib
import importlib.util
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BENCHMARKS = ROOT / "docs" / "benchmarks"

# Folders of the repository a cited path may start with.
REPO_PREFIXES = ("tests", "docs", "nnunet_logonet", "trainers", "planners", "scripts", ".ci")
# Sub-packages a path may be written relative to (`network/conv.py`, `kernels/depthwise.py`).
PACKAGE_DIRS = ("network", "kernels", "benchmark", "training", "ssl", "msd", "phantom", "planning", "demo")
# Where `file.py::Symbol` and package-relative paths are looked up, in this order.
SOURCE_DIRS = ("nnunet_logonet", "trainers", "planners", "tests", ".ci", "scripts")

_REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w.{},*/-]*)" % "|".join(re.escape(p) for p in REPO_PREFIXES))
_PACKAGE_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w/.-]*(?:\.py|/))" % "|".join(PACKAGE_DIRS))
_BARE_JSON = re.compile(r"(?<![\w./{},*-])([\w-]+(?:\.[\w-]+)*\.json)(?![\w/])")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_MODULE = re.compile(r"python3?\s+-m\s+(nnunet_logonet(?:\.\w+)*)")
# A console script where a shell would run it: start of a span or command line, or after
# `$(`, `(`, `&&`, `||`, `;`, `|`, optionally behind `VAR=value` assignments or `time`.
_SCRIPT = re.compile(r"(?:^|\$\(|[;&|(])\s*(?:[A-Za-z_]\w*=\S*\s+)*(?:time\s+)?(logonet_\w+)(?![\w.:])")
_SEPARATOR = re.compile(r"&&|\|\||;|\s\|\s|\)|\s#")
_LONG_FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)")
_TEST_NAME = re.compile(r"(?<![\w/.-])(test_\w+)(?!\w|\.py)")
_SYMBOL = re.compile(r"(?<![\w/.-])([\w./-]*\w\.py)::([\w.:]*\w)")
# `...`, `<plans>`, `[x]`, or an upper-case word standing for a value (`lever_ab/L_64.json`, `FILE`).
_PLACEHOLDER = re.compile(r"\.\.\.|<|>|\[|\]|(?:^|[/_.-])(?!README\b)[A-Z][A-Z0-9]*(?=[/_.-]|$)")
# nnU-Net's own files, named bare in the docs; not benchmark records.
NNUNET_FILES = {"dataset.json", "plans.json", "splits_final.json", "dataset_fingerprint.json", "progress.json",
                "summary.json", "debug.json"}
# Paths the docs cite on purpose as no longer there (doc, path): keep this list short and explained.
ABSENT_ON_PURPOSE = {
    # "`cuda_96_h100_compile.json` was not kept"
    ("docs/benchmarks/README.md", "cuda_96_h100_compile.json"),
    # the command as run; "the files are now `cpu_32x64x64_first_presets_reference.json` and ..."
    ("docs/speed.md", "docs/benchmarks/cpu_32x64x64_reference.json"),
}


@dataclass(frozen=True, order=True)
class Ref:
    """One reference found in a doc: its 1-based line and the cited text."""

    line: int
    text: str


# ---------------------------------------------------------------- Markdown parsing


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _blank_fences(text: str) -> tuple[str, list[Ref]]:
    """The text with fenced code blocks blanked (same line numbers), and their logical lines.

    A logical line joins lines continued with a trailing backslash, as a shell would.
    """
    lines = text.split("\n")
    kept, commands = [], []
    fence: str | None = None
    pending: Ref | None = None
    for number, line in enumerate(lines, start=1):
        marker = re.match(r"\s*(`{3,}|~{3,})", line)
        if fence is None and marker:
            fence = marker.group(1)
            kept.append("")
            continue
        if fence is not None:
            if line.strip().startswith(fence):
                fence = None
            else:
                body = line.rstrip()
                joined = body[:-1] if body.endswith("\\") else body
                pending = Ref(pending.line, pending.text + " " + joined) if pending else Ref(number, joined)
                if not body.endswith("\\"):
                    commands.append(pending)
                    pending = None
            kept.append("")
            continue
        kept.append(line)
    if pending:
        commands.append(pending)
    return "\n".join(kept), commands


def code_spans(text: str) -> list[Ref]:
    """Inline code spans (they may run over a line break) and fenced code lines, whitespace collapsed.

    Table cells escape `|` as `\\|`; it is unescaped here.
    """
    prose, spans = _blank_fences(text)
    for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", prose, flags=re.S):
        if "\n\n" not in match.group(2):
            spans.append(Ref(_line_of(prose, match.start()), match.group(2)))
    return sorted(Ref(s.line, " ".join(s.text.replace("\\|", "|").split())) for s in spans)


def _strip_punctuation(path: str) -> str:
    return path.rstrip(".,:;)")


def _expand_braces(path: str) -> list[str] | None:
    """`a_{64,96}.json` -> both names; None for braces that are not a simple comma list."""
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return None if "{" in path or "}" in path else [path]
    if "," not in match.group(1):
        return None
    out: list[str] = []
    for choice in match.group(1).split(","):
        expanded = _expand_braces(path[:match.start()] + choice + path[match.end():])
        if expanded is None:
            return None
        out += expanded
    return out


def _exists(root: Path, pattern: str) -> bool:
    """Whether a path (or, with `*`, at least one match of the glob) exists under ``root``."""
    if "*" in pattern:
        return any(root.glob(pattern.rstrip("/")))
    return (root / pattern).exists()


@functools.lru_cache(maxsize=None)
def _package_files() -> tuple[str, ...]:
    """Every file and folder under SOURCE_DIRS, relative to the root."""
    return tuple(sorted(str(p.relative_to(ROOT)) for d in SOURCE_DIRS for p in (ROOT / d).rglob("*")
                        if "__pycache__" not in p.parts))


def broken_paths(text: str, doc: Path) -> list[Ref]:
    """Cited paths that do not exist.

    Checked: paths from the repository root (`tests/...`, `docs/...`, ...), paths relative to a
    sub-package (`network/conv.py`), relative Markdown links, and bare `*.json` names of benchmark
    records (in docs/benchmarks/ or below; a name counts as one in a doc of that folder, on a line
    that names docs/benchmarks, or when it starts with `cpu_`/`cuda_`). Names with `...`, `<...>`
    or a non-list brace are placeholders and skipped; `*` must match something; `{a,b}` is expanded.
    """
    broken: list[Ref] = []
    lines = text.split("\n")
    files = _package_files()

    def check(line: int, cited: str, exists: Callable[[str], bool]) -> None:
        if _PLACEHOLDER.search(cited):
            return
        expanded = _expand_braces(cited)
        if expanded is not None and not all(exists(p) for p in expanded):
            broken.append(Ref(line, cited))

    for match in _REPO_PATH.finditer(text):
        check(_line_of(text, match.start()), _strip_punctuation(match.group(1)), lambda p: _exists(ROOT, p))

    for match in _PACKAGE_PATH.finditer(text):
        path = _strip_punctuation(match.group(1))
        check(_line_of(text, match.start()), path,
              lambda p: any(f == p.rstrip("/") or f.endswith("/" + p.rstrip("/")) for f in files)
              or _exists(ROOT / "nnunet_logonet", p))

    for match in _LINK.finditer(text):
        target = match.group(1).split("#")[0]
        if not target or re.match(r"[a-z]+:", target) or target.startswith("/"):
            continue
        check(_line_of(text, match.start()), target, lambda p: _exists(doc.parent, p))

    in_benchmarks = BENCHMARKS in doc.parents
    for match in _BARE_JSON.finditer(text):
        name = match.group(1)
        line = _line_of(text, match.start())
        if name in NNUNET_FILES or name != name.lower():
            continue
        if not (in_benchmarks or "docs/benchmarks" in lines[line - 1] or name.startswith(("cpu_", "cuda_"))):
            continue
        check(line, name, lambda p: _exists(doc.parent, p) or any(BENCHMARKS.rglob(p)))
    return sorted(set(broken), key=lambda r: (r.line, r.text))


def cited_modules(text: str) -> list[Ref]:
    """Every `python -m nnunet_logonet.X` (also when the line breaks after `-m`)."""
    return [Ref(_line_of(text, m.start()), m.group(1)) for m in _MODULE.finditer(text)]


def model_names() -> set[str]:
    """The benchmark's model names (`logonet_s`, ...): they look like console scripts but are not."""
    source = (ROOT / "nnunet_logonet" / "benchmark" / "models.py").read_text()
    return set(re.findall(r'^\s+"(\w+)":', source, flags=re.M))


@dataclass(frozen=True)
class Invocation:
    """A command cited in a code span or command line, with the long flags written after it."""

    line: int
    command: str  # a console script name, or `python -m` + module
    flags: tuple[str, ...]


def invocations(text: str, not_commands: Iterable[str] = ()) -> list[Invocation]:
    """Each `logonet_*` console script or `python -m nnunet_logonet.X` in a code span, with its flags.

    A command's flags run up to the next command, `&&`, `;`, `|`, `)` or `#` in the same span.
    """
    skip = set(not_commands)
    found: list[Invocation] = []
    for span in code_spans(text):
        starts: list[tuple[int, int, str]] = []
        for m in _SCRIPT.finditer(span.text):
            if m.group(1) not in skip:
                starts.append((m.start(1), m.end(1), m.group(1)))
        for m in _MODULE.finditer(span.text):
            starts.append((m.start(), m.end(), "python -m " + m.group(1)))
        starts.sort()
        for i, (_, end, command) in enumerate(starts):
            stop = starts[i + 1][0] if i + 1 < len(starts) else len(span.text)
            rest = span.text[end:stop]
            separator = _SEPARATOR.search(rest)
            rest = rest[:separator.start()] if separator else rest
            found.append(Invocation(span.line, command, tuple(_LONG_FLAG.findall(rest))))
    return found


def cited_test_names(text: str) -> list[Ref]:
    """Words starting with `test_` in code spans (parametrized ids like `[True]` fall away)."""
    return [Ref(span.line, name) for span in code_spans(text) for name in _TEST_NAME.findall(span.text)]


def cited_symbols(text: str) -> list[tuple[int, str, str]]:
    """Every `path.py::Symbol` (also `Class.method` or `Class::method`): (line, path, symbol)."""
    return [(_line_of(text, m.start()), m.group(1), m.group(2).replace("::", "."))
            for m in _SYMBOL.finditer(text)]


# ---------------------------------------------------------------- what the tree defines


def console_scripts() -> dict[str, str]:
    """setup.cfg's console scripts: name -> `module:function`."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = {}
    for line in config["options.entry_points"]["console_scripts"].strip().splitlines():
        name, _, target = line.partition("=")
        scripts[name.strip()] = target.strip()
    return scripts


def defined_test_names() -> set[str]:
    return {name for path in (ROOT / "tests").rglob("*.py")
            for name in re.findall(r"^\s*(?:async\s+)?def\s+(test_\w+)", path.read_text(), flags=re.M)}


def _names_in(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """Names a block defines: def, class, assignments (also under top-level if/try)."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        names[sub.id] = node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                names.update(_names_in(getattr(node, block, [])))
            for handler in getattr(node, "handlers", []):
                names.update(_names_in(handler.body))
    return names


def resolve_source(path: str) -> Path | None | str:
    """The file a `path.py` of the docs means: from the root, the package, or a unique suffix.

    Returns "ambiguous" when several files end with that path.
    """
    for base in (ROOT, ROOT / "nnunet_logonet"):
        if (base / path).is_file():
            return base / path
    matches = [ROOT / f for f in _package_files() if f.endswith("/" + path)]
    if len(matches) > 1:
        return "ambiguous"
    return matches[0] if matches else None


def symbol_defined(source: Path, symbol: str) -> bool:
    """Whether `symbol` (`name` or `Class.method`) is defined at the top of ``source``."""
    body = ast.parse(source.read_text()).body
    for part in symbol.split("."):
        node = _names_in(body).get(part)
        if node is None:
            return False
        body = node.body if isinstance(node, ast.ClassDef) else []
    return True


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__()
        self.parser = parser


def parser_of(function: Callable) -> argparse.ArgumentParser:
    """The argparse parser of a command's ``main``: its module's ``build_parser()`` if it has one,
    else the parser ``main`` builds, caught when ``main([])`` calls ``parse_known_args``.
    """
    module = inspect.getmodule(function)
    build = getattr(module, "build_parser", None)
    if callable(build):
        return build()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = capture
    try:
        function([])
    except _Captured as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
    raise AssertionError(f"{module.__name__}: main([]) returned without parsing arguments")


@functools.lru_cache(maxsize=None)
def options_of(command: str) -> frozenset[str]:
    """Every option string the command's parser (and its subparsers) accepts."""
    if command.startswith("python -m "):
        module = importlib.import_module(command.removeprefix("python -m "))
        function = module.main
    else:
        module_name, _, attribute = console_scripts()[command].partition(":")
        function = getattr(importlib.import_module(module_name), attribute)
    parsers, options = [parser_of(function)], set()
    while parsers:
        parser = parsers.pop()
        options |= set(parser._option_string_actions)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return frozenset(options)


# ---------------------------------------------------------------- the checks, over (name, path, text) docs

Doc = tuple[str, Path, str]


def real_docs() -> list[Doc]:
    return [(str(doc.relative_to(ROOT)), doc, doc.read_text(encoding="utf-8")) for doc in DOCS]


def path_problems(docs: Iterable[Doc]) -> list[str]:
    return [f"{name}:{ref.line}: {ref.text}" for name, doc, text in docs
            for ref in broken_paths(text, doc) if (name, ref.text) not in ABSENT_ON_PURPOSE]


def module_problems(docs: Iterable[Doc]) -> list[str]:
    return [f"{name}:{ref.line}: python -m {ref.text}" for name, _, text in docs
            for ref in cited_modules(text) if importlib.util.find_spec(ref.text) is None]


def _known_command(command: str) -> bool:
    if command.startswith("python -m "):
        return importlib.util.find_spec(command.removeprefix("python -m ")) is not None
    return command in console_scripts()


def script_problems(docs: Iterable[Doc]) -> list[str]:
    return [f"{name}:{inv.line}: {inv.command}" for name, _, text in docs
            for inv in invocations(text, model_names())
            if not inv.command.startswith("python -m ") and not _known_command(inv.command)]


def flag_problems(docs: Iterable[Doc]) -> list[str]:
    """Unknown commands are skipped here: the two checks above report them."""
    problems = []
    for name, _, text in docs:
        for inv in invocations(text, model_names()):
            if _known_command(inv.command):
                unknown = [flag for flag in inv.flags if flag not in options_of(inv.command)]
                if unknown:
                    problems.append(f"{name}:{inv.line}: {inv.command} {' '.join(unknown)}")
    return problems


def cited_test_problems(docs: Iterable[Doc]) -> list[str]:
    defined = defined_test_names()
    return [f"{name}:{ref.line}: {ref.text}" for name, _, text in docs
            for ref in cited_test_names(text) if ref.text not in defined]


def symbol_problems(docs: Iterable[Doc]) -> list[str]:
    problems = []
    for name, _, text in docs:
        for line, path, symbol in cited_symbols(text):
            source = resolve_source(path)
            if source is None:
                problems.append(f"{name}:{line}: {path}::{symbol} (no such file)")
            elif source != "ambiguous" and not symbol_defined(source, symbol):
                problems.append(f"{name}:{line}: {path}::{symbol} (not defined in {source.relative_to(ROOT)})")
    return problems


def _report(what: str, problems: list[str]) -> str:
    return f"{len(problems)} {what}:\n  " + "\n  ".join(problems)


def test_docs_are_found():
    """Guards the checks below against silently parsing nothing."""
    names = {name for name, _, _ in real_docs()}
    assert {"README.md", "docs/speed.md", "docs/benchmarks/README.md"} <= names


def test_cited_paths_exist():
    """A moved or deleted file must not stay cited."""
    problems = path_problems(real_docs())
    assert not problems, _report("cited paths do not exist", problems)


def test_cited_modules_exist():
    """`python -m nnunet_logonet.X` must name a module of the package."""
    problems = module_problems(real_docs())
    assert not problems, _report("cited modules do not exist", problems)


def test_cited_console_scripts_exist():
    """A `logonet_*` command of the docs must be a console script of setup.cfg."""
    problems = script_problems(real_docs())
    assert not problems, _report("cited commands are not console scripts in setup.cfg", problems)


def test_cited_flags_are_accepted():
    """Each long flag written after one of our commands must be an option of its parser."""
    problems = flag_problems(real_docs())
    assert not problems, _report("cited flags are not accepted by their command", problems)


def test_cited_test_names_exist():
    """A test the docs point to as evidence must still exist in tests/."""
    problems = cited_test_problems(real_docs())
    assert not problems, _report("cited tests are not defined in tests/", problems)


def test_cited_symbols_are_defined():
    """`path.py::Symbol` must name a def, class or assignment at the top of that file."""
    problems = symbol_problems(real_docs())
    assert not problems, _report("cited symbols are not defined", problems)


# ---------------------------------------------------------------- the checks catch what they should


SYNTHETIC = """\
Run `logonet_benchmark --device cpu --no-such-flag 3` (also `logonet_nosuch --x`), see
`tests/test_no_such_file.py` and docs/benchmarks/cpu_no_such_run.json, `docs/benchmarks/lever_ab/lka_folding_{64,99}_zen4.json`,
`python -m
nnunet_logonet.benchmark.no_such_module` and `test_no_such_test[True]`; `network/conv.py::no_such_symbol`.
The model `logonet_s` is no command; `docs/benchmarks/cpu_*.json`, `docs/...` and `lever_ab/L_64.json` are fine;
`nosuch/file.py::f`.

```bash
logonet_lever_ab --lever stitch_add \\
    --figures train --bogus   # a comment --not-a-flag
```
"""


def test_parsers_find_each_kind_of_reference():
    """Each parser finds the references planted in synthetic text, on the right line."""
    assert broken_paths(SYNTHETIC, ROOT / "docs" / "x.md") == [
        Ref(2, "docs/benchmarks/cpu_no_such_run.json"),
        Ref(2, "docs/benchmarks/lever_ab/lka_folding_{64,99}_zen4.json"),
        Ref(2, "tests/test_no_such_file.py")]
    assert cited_modules(SYNTHETIC) == [Ref(3, "nnunet_logonet.benchmark.no_such_module")]
    assert [(i.line, i.command, i.flags) for i in invocations(SYNTHETIC, model_names())] == [
        (1, "logonet_benchmark", ("--device", "--no-such-flag")),
        (1, "logonet_nosuch", ("--x",)),
        (3, "python -m nnunet_logonet.benchmark.no_such_module", ()),
        (9, "logonet_lever_ab", ("--lever", "--figures", "--bogus"))]
    assert Ref(4, "test_no_such_test") in cited_test_names(SYNTHETIC)
    assert cited_symbols(SYNTHETIC) == [(4, "network/conv.py", "no_such_symbol"), (6, "nosuch/file.py", "f")]


def test_checks_report_references_broken_in_a_real_doc():
    """README.md with the synthetic text appended: each check reports exactly the planted breakage."""
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    offset = text.count("\n")
    docs = [("README.md", readme, text + SYNTHETIC)]

    def at(line: int) -> str:
        return f"README.md:{offset + line}: "

    assert path_problems(docs) == [at(2) + "docs/benchmarks/cpu_no_such_run.json",
                                   at(2) + "docs/benchmarks/lever_ab/lka_folding_{64,99}_zen4.json",
                                   at(2) + "tests/test_no_such_file.py"]
    assert module_problems(docs) == [at(3) + "python -m nnunet_logonet.benchmark.no_such_module"]
    assert script_problems(docs) == [at(1) + "logonet_nosuch"]
    assert flag_problems(docs) == [at(1) + "logonet_benchmark --no-such-flag", at(9) + "logonet_lever_ab --bogus"]
    assert cited_test_problems(docs) == [at(4) + "test_no_such_test"]
    assert symbol_problems(docs) == [
        at(4) + "network/conv.py::no_such_symbol (not defined in nnunet_logonet/network/conv.py)",
        at(6) + "nosuch/file.py::f (no such file)"]
