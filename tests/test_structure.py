"""Package structure: the import graph of ``ldetok`` (modules importing modules) has no cycles, and
imports inside functions are kept to optional dependencies.

Run as a script (``python tests/test_structure.py``) to print the graph's cycles and every
function-level import.

The graph is read from the source with ``ast`` (nothing is imported). An edge ``a -> b`` means that
module ``a`` imports module ``b``; importing ``ldetok.x.y`` also runs the package ``ldetok.x``, so the
package is an edge too (except from inside that package, which is already being imported).
``if TYPE_CHECKING:`` blocks are skipped.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "ldetok"

# Third-party packages that may be imported inside functions: optional extras (the package works
# without them) and heavy or slow imports that only one command needs. The standard library is free.
OPTIONAL = {
    "gradio", "lpips", "papermill", "wandb", "tensorboard", "torch.utils.tensorboard", "torch_fidelity", "scipy",
    "sklearn", "skimage", "matplotlib", "timm", "tqdm", "torchvision", "PIL", "safetensors", "huggingface_hub",
    "IPython", "ipywidgets", "pandas", "jupyter_client",  # the notebooks extra
}

# Function-level imports of ldetok modules (and of torch) that remain, as {importing module: targets}.
# No entry may be added; an entry goes when its import moves to the top of its module.
ALLOWED_LOCAL = {
    # command-line entry points: ``ldetok --help`` and ``ldetok demo`` start without loading torch
    "ldetok.cli": {"*"},
    "ldetok.demo.cli": {"*"},
    "ldetok.sweep": {"ldetok.runs", "torch"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / PKG).rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> list[str]:
    """The ldetok modules (and third-party top names) an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    out = [target]
    for a in node.names:  # ``from . import corruption``: the name is a submodule
        if f"{target}.{a.name}" in known:
            out.append(f"{target}.{a.name}")
    return out


def _with_parents(name: str, known: set[str], importer: str = "") -> list[str]:
    """``name`` and the packages above it that importing it runs: not those that contain ``importer``
    (a submodule's own packages are already being imported when it runs)."""
    parts = name.split(".")
    pkgs = [".".join(parts[:i]) for i in range(2, len(parts))]
    out = [p for p in pkgs if p in known and not importer.startswith(p + ".")]
    return out + ([name] if name in known and name != PKG else [])


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def scan():
    """(top-level edges {mod: {mod}}, function-level imports [(mod, lineno, target)])."""
    mods = modules()
    known = set(mods)
    top: dict[str, set[str]] = defaultdict(set)
    inner: list[tuple[str, int, str]] = []
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child):
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _resolve(mod, is_pkg, child, known):
                        if target == "__future__":
                            continue
                        if in_function:
                            inner.append((mod, child.lineno, target))
                        else:
                            for t in _with_parents(target, known, mod):
                                if t != mod:
                                    top[mod].add(t)
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(tree, False)
    return top, inner


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _local(target: str) -> bool:
    return target == PKG or target.startswith(PKG + ".")


def _allowed_local(mod: str, target: str) -> bool:
    return bool(ALLOWED_LOCAL.get(mod, set()) & {"*", target})


def _optional(target: str) -> bool:
    top = target.split(".")[0]
    return top in sys.stdlib_module_names or any(target == o or target.startswith(o + ".") for o in OPTIONAL)


def test_no_import_cycles_among_top_level_imports():
    top, _ = scan()
    assert "ldetok.runs" in {m for m in modules()}
    assert not cycles(top), f"import cycles among ldetok modules: {cycles(top)}"


def test_cycle_detector_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycle_even_counting_function_level_imports():
    # a function-level import of an ldetok module is never there to dodge a cycle
    top, inner = scan()
    graph = {k: set(v) for k, v in top.items()}
    known = set(modules())
    for mod, _, target in inner:
        for t in _with_parents(target, known, mod):
            if t != mod:
                graph.setdefault(mod, set()).add(t)
    assert not cycles(graph), f"cycles once function-level imports count: {cycles(graph)}"


def test_function_level_imports_are_listed():
    _, inner = scan()
    local = sorted({(m, t) for m, _, t in inner if _local(t) and not _allowed_local(m, t)})
    assert not local, "function-level imports of ldetok modules (move them to the top):\n" + "\n".join(
        f"  {m} -> {t}" for m, t in local)
    third = sorted({(m, t) for m, _, t in inner if not _local(t) and not _optional(t) and not _allowed_local(m, t)})
    used = {(m, t) for m, _, t in inner}
    stale = sorted((m, t) for m, ts in ALLOWED_LOCAL.items() for t in ts if t != "*" and (m, t) not in used)
    assert not stale, f"ALLOWED_LOCAL lists imports that are gone (remove them): {stale}"
    assert not third, "function-level imports of non-optional packages:\n" + "\n".join(f"  {m} -> {t}" for m, t in third)


def test_layering():
    """The directions the package keeps: the engine never imports eval, sampling never imports a trainer,
    the run folder module never imports the engine, eval or the latent cache."""
    top, inner = scan()
    edges = {(m, t) for m, ts in top.items() for t in ts} | {(m, t) for m, _, t in inner}
    bad = sorted((m, t) for m, t in edges if (m.startswith("ldetok.engine") and t.startswith("ldetok.eval"))
                 or (m == "ldetok.sampling" and t.endswith("_trainer"))
                 or (m == "ldetok.runs" and t.split(".")[1] in ("engine", "eval", "latents", "sampling")))
    assert not bad, f"imports against the layering: {bad}"


def report() -> str:
    top, inner = scan()
    lines = [f"{len(modules())} modules, {sum(map(len, top.values()))} top-level edges"]
    cyc = cycles(top)
    lines.append("cycles (top-level imports): " + ("none" if not cyc else ""))
    lines += [f"  {' <-> '.join(c)}" for c in cyc]
    lines.append("function-level imports of ldetok modules:")
    lines += [f"  {m}:{n} -> {t}" for m, n, t in sorted(inner) if _local(t)]
    lines.append("function-level imports of other packages:")
    lines += [f"  {m}:{n} -> {t}" for m, n, t in sorted(inner) if not _local(t)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
