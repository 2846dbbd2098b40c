"""The package's import graph: layers with no arrow back up, and no import cycle (lazy imports included)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "amvlm_monai"
#: lowest first; a module may import its own layer and the layers before it
LAYERS = ("utils", "io", "data", "transforms", "networks", "losses", "evaluation", "engines", "handlers", "inference",
          "workflows")


def module_imports() -> dict[str, set[str]]:
    """``{module: {imported amvlm_monai modules}}`` from every ``import`` statement, at any depth of the file."""
    modules = {("amvlm_monai." + ".".join(f.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in PKG.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:  # relative: resolve against the package
                base = mod.rsplit(".", node.level if path.name != "__init__.py" else node.level - 1)[0]
                names = [f"{base}.{node.module}" if node.module else base]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            found |= {n for n in names if n in modules and n != mod}
        graph[mod] = found
    return graph


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_lives_in_a_layer():
    loose = [m for m in module_imports() if m != "amvlm_monai" and layer(m) not in LAYERS]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_no_layer_imports_a_higher_one():
    up = [f"{a} -> {b}" for a, targets in module_imports().items() for b in targets
          if a != "amvlm_monai" and LAYERS.index(layer(b)) > LAYERS.index(layer(a))]
    assert not up, "imports that go up a layer:\n" + "\n".join(sorted(up))


def test_networks_import_neither_engines_nor_losses():
    bad = [f"{a} -> {b}" for a, targets in module_imports().items() if layer(a) == "networks"
           for b in targets if layer(b) in ("engines", "losses")]
    assert not bad, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path that ends where it starts, or [] (depth-first search, colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return []

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return []


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle():
    graph = module_imports()
    # a package's __init__ that re-exports its own modules is not a cycle with them
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)
