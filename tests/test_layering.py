"""The import graph (module-level and function-level imports alike): export and runtimes never import each other,
runtimes/ holds no benchmark peers, and no cycle exists between edgevlm's modules."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgevlm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("edgevlm"):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_export_and_runtimes_do_not_import_each_other():
    graph = import_graph()
    crossing = sorted((a, b) for a, targets in graph.items() for b in targets
                      if (a.startswith("edgevlm.export") and b.startswith("edgevlm.runtimes"))
                      or (a.startswith("edgevlm.runtimes") and b.startswith("edgevlm.export")))
    assert crossing == []


def test_no_import_cycles():
    graph = import_graph()
    # the package root re-exports `load` and `__version__`; edges into it are not layering
    graph = {m: {t for t in targets if t != "edgevlm"} for m, targets in graph.items()}
    assert cycles(graph) == []


def test_the_walker_sees_function_level_imports():
    graph = import_graph()
    assert "edgevlm.runtimes.llamacpp" in graph["edgevlm.runtimes.bundle_loader"]  # imported inside a function
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_bench_may_read_plan_but_plan_never_reads_bench():
    graph = import_graph()
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if a.startswith(("edgevlm.plan", "edgevlm.sweep")) and b.startswith("edgevlm.bench"))
    assert upward == []
    assert any(b.startswith("edgevlm.plan") for a, targets in graph.items() if a.startswith("edgevlm.bench")
               for b in targets)  # the allowed direction is in use: the walker would see a reversed arrow


def test_the_machine_module_is_a_leaf():
    graph = import_graph()
    assert graph["edgevlm.machine"] <= {"edgevlm.errors"}
    assert graph["edgevlm.gguf_header"] <= {"edgevlm.errors"}
    assert graph["edgevlm.hash_stamps"] == set()


def test_runtimes_hold_no_benchmark_peers():
    """runtimes/ is what a device runs; the programs edgevlm is measured and verified against (llama.cpp's mtmd)
    live in bench/peers and reuse the runtime's llama.cpp model and context, never the other way round."""
    graph = import_graph()
    runtimes = {m for m in graph if m.startswith("edgevlm.runtimes")}
    assert sorted((a, b) for a in runtimes for b in graph[a] if b.startswith("edgevlm.bench")) == []
    peers = [p.name for p in (PACKAGE / "runtimes").rglob("*.py")
             if any(call in p.read_text() for call in ("require_mtmd", "mtmd_init_from_file", "MtmdPipeline"))]
    assert peers == []  # libmtmd, llama.cpp's multimodal path, is what edgevlm is compared with
    assert "edgevlm.runtimes.llamacpp" in graph["edgevlm.bench.peers.mtmd"]
