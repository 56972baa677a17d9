"""Measure the code structure of a gaussian-ad source tree and print a plain-text report.

What it measures:

1. Lines of code per layer: non-blank lines that are not comment-only, in the ``.py`` files of
   each flat module ``gaussian_ad/foo.py``, each subpackage ``gaussian_ad/sub/``, and the
   ``tasks/``, ``flows/``, ``tests/`` and ``bench/`` folders; with totals for the library,
   tasks and flows.
2. The ten longest functions and methods (``def`` line to ``end_lineno``) in the library,
   tasks and flows, with their parameter counts.
3. Every function or method there with more than eight parameters (positional, keyword-only,
   ``*args`` and ``**kwargs`` each count one; a leading ``self``/``cls`` does not).
4. The number of duplicate pairs that the ``duplicates`` command reports over the whole tree,
   when that command is on PATH.

Usage: ``python bench/code_metrics.py [ROOT]`` (ROOT defaults to the repository root).
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

LIBRARY = "gaussian_ad"
APP_DIRS = ("tasks", "flows")
OTHER_DIRS = ("tests", "bench")
MAX_PARAMS = 8
TOP_N = 10


@dataclass(frozen=True)
class Function:
    path: str
    qualname: str
    lines: int
    params: int


def skipped(part: str) -> bool:
    return part.startswith(".") or part == "__pycache__"


def python_files(root: Path, folder: str) -> list[Path]:
    """The .py files below root/folder, skipping hidden and cache folders."""
    base = root / folder
    if not base.is_dir():
        return []
    return sorted(p for p in base.rglob("*.py") if not any(map(skipped, p.relative_to(root).parts)))


def code_lines(path: Path) -> int:
    """Non-blank lines that are not comment-only."""
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = (line.strip() for line in text.splitlines())
    return sum(1 for line in stripped if line and not line.startswith("#"))


def layer_of(rel: Path) -> str:
    """gaussian_ad/foo.py for a flat module, gaussian_ad/sub/ for a subpackage, else top/."""
    if rel.parts[0] == LIBRARY and len(rel.parts) == 2:
        return rel.as_posix()
    if rel.parts[0] == LIBRARY:
        return f"{LIBRARY}/{rel.parts[1]}/"
    return f"{rel.parts[0]}/"


def param_count(node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    count = len(positional) + len(args.kwonlyargs)
    count += (args.vararg is not None) + (args.kwarg is not None)
    if in_class and positional and positional[0].arg in ("self", "cls"):
        count -= 1
    return count


def functions(path: Path, rel: str) -> list[Function]:
    """Every function and method in a file, with dotted qualnames (Class.method, outer.inner)."""
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), filename=str(path))
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", True)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                qualname = f"{prefix}{child.name}"
                found.append(Function(rel, qualname, lines, param_count(child, in_class)))
                visit(child, f"{qualname}.", False)
            else:
                visit(child, prefix, in_class)

    visit(tree, "", False)
    return found


def report_lines(root: Path) -> None:
    per_layer: dict[str, int] = defaultdict(int)
    for folder in (LIBRARY, *APP_DIRS, *OTHER_DIRS):
        for path in python_files(root, folder):
            per_layer[layer_of(path.relative_to(root))] += code_lines(path)
    print("== Lines per layer (non-blank, non-comment-only .py lines)")
    for layer in sorted(per_layer):
        print(f"{per_layer[layer]:7d}  {layer}")
    library = sum(n for layer, n in per_layer.items() if layer.startswith(f"{LIBRARY}/"))
    print(f"{library:7d}  total {LIBRARY} (all)")
    apps = {folder: per_layer.get(f"{folder}/", 0) for folder in APP_DIRS}
    for folder, n in apps.items():
        print(f"{n:7d}  total {folder}/")
    print(f"{library + sum(apps.values()):7d}  total {LIBRARY}+{'+'.join(APP_DIRS)}")


def report_functions(root: Path) -> None:
    found = [
        fn
        for folder in (LIBRARY, *APP_DIRS)
        for path in python_files(root, folder)
        for fn in functions(path, path.relative_to(root).as_posix())
    ]
    print(f"\n== {TOP_N} longest functions/methods ({LIBRARY}/, tasks/, flows/): lines  params")
    for fn in sorted(found, key=lambda f: (-f.lines, f.path, f.qualname))[:TOP_N]:
        print(f"{fn.path}:{fn.qualname}  {fn.lines}  {fn.params}")
    many = [fn for fn in found if fn.params > MAX_PARAMS]
    print(f"\n== Functions/methods with more than {MAX_PARAMS} parameters: {len(many)}")
    for fn in sorted(many, key=lambda f: (-f.params, f.path, f.qualname)):
        print(f"{fn.path}:{fn.qualname}  {fn.params}")


def report_duplicates(root: Path) -> None:
    print("\n== duplicates (whole tree)")
    if shutil.which("duplicates") is None:
        print("duplicates: not on PATH")
        return
    # `duplicates --help` documents: --repo DIR, --most N (1..200), --seconds N (2..600); the
    # first line counts the pairs ("N pairs of places ..." or "no duplicates ..."), then one
    # row a pair ("D1 a.py:10-24 ~ b.py:40-54"), then "(+N more pairs)" when --most cut it.
    command = ["duplicates", "--repo", str(root), "--most", "200", "--seconds", "120"]
    out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    summary = lines[0] if lines else "(no output)"
    match = re.match(r"(\d+) pairs?\b", summary)
    pairs = match.group(1) if match else "0" if summary.startswith("no duplicates") else "unknown"
    rows = sum(1 for line in lines if re.match(r"D\d+ ", line))
    cut = [re.match(r"\(\+(\d+) more pairs?\)", line) for line in lines]
    more = sum(int(m.group(1)) for m in cut if m)
    print(f"pairs: {pairs}  (rows listed: {rows}, more not listed: {more})")
    print(f"summary: {summary}")
    for line in lines[1:]:
        if line.startswith(("left out:", "incomplete:")):
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    default_root = Path(__file__).resolve().parent.parent
    parser.add_argument("root", nargs="?", type=Path, default=default_root, help="source tree")
    root: Path = parser.parse_args().root.resolve()
    print(f"Code metrics for {root}\n")
    report_lines(root)
    report_functions(root)
    report_duplicates(root)


if __name__ == "__main__":
    main()
