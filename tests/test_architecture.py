"""The package's shape, checked from its source: one owner per concept, no import cycle, data flowing one
way (settings → models / hardware / precision → weights → inference → debugging → runtime → service | ops →
bench → cli), every module placed in a layer, modules and functions small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sd35"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every sd35 module `path` imports, at module level or inside functions (both count for cycles)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("sd35")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("sd35"):
                continue
            for alias in node.names:  # `from . import debug` imports the module sd35.debug
                sub = f"{mod}.{alias.name}"
                found.add(sub if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (SRC.parent / sub.replace(".", "/")).is_dir() else mod)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m not in g:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def _reaches(g, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in g.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_no_import_cycle_in_sd35():
    cycle = _cycle(graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle)


# The layers, lowest first. A module may import its own layer and the layers below it, never above; the
# packages of one layer do not import each other. Every module under src/sd35 must be placed here, so a new
# module gets a layer on purpose.
LAYERS = [
    ("base", {"sd35", "sd35.settings", "sd35.errors", "sd35.logs", "sd35.models", "sd35.net"}),
    ("hardware", {"sd35.hardware"}),
    ("precision", {"sd35.precision"}),
    ("weights", {"sd35.weights"}),
    ("inference", {"sd35.inference"}),
    ("debugging", {"sd35.debugging"}),
    ("runtime", {"sd35.runtime"}),
    ("service/ops", {"sd35.service", "sd35.ops"}),
    ("bench", {"sd35.bench"}),
    ("cli", {"sd35.cli"}),
    ("entry point", {"sd35.__main__"}),
]


def _place(module: str) -> tuple[int, str]:
    """(layer index, the package or module of that layer `module` belongs to)."""
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m != "sd35" and module.startswith(m + ".")):
                return i, m
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_architecture.py")


def test_every_module_has_a_layer_and_imports_only_downwards():
    g = graph()
    for mod, deps in sorted(g.items()):
        layer, owner = _place(mod)
        for dep in deps:
            dep_layer, dep_owner = _place(dep)
            assert dep_layer <= layer, (f"{mod} ({LAYERS[layer][0]}) imports {dep} ({LAYERS[dep_layer][0]}): "
                                        "a lower layer reaches up")
            assert dep_layer < layer or dep_owner == owner or dep_owner == "sd35", (
                f"{mod} imports {dep}: packages of one layer ({LAYERS[layer][0]}) stay independent")
    assert _reaches(g, "sd35.settings") <= {"sd35.errors", "sd35"}, _reaches(g, "sd35.settings")
    # Only the entry point imports the CLI.
    assert {m for m, deps in g.items() if any(_place(d)[1] == "sd35.cli" for d in deps)
            and _place(m)[1] != "sd35.cli"} <= {"sd35.__main__"}


def test_modules_and_functions_stay_small():
    """No module over ~400 lines; no function over ~80 lines unless it reads as numbered steps (`# 1.`)."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        lines = text.splitlines()
        assert len(lines) <= 420, f"{path.relative_to(SRC)}: {len(lines)} lines (split it by job)"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                body = "\n".join(lines[node.lineno - 1:node.end_lineno])
                assert re.search(r"#\s*1\.", body), (f"{path.relative_to(SRC)}:{node.lineno} {node.name} is "
                                                     f"{node.end_lineno - node.lineno + 1} lines without numbered steps")


def test_cli_and_worker_generate_through_the_runtime():
    for path in (SRC / "cli" / "generate.py", SRC / "service" / "worker.py"):
        text = path.read_text()
        assert "gen.run(" not in text and "generate.run(" not in text, f"{path.name} bypasses the runtime"
        assert "Runtime" in text
    for nb in (SRC.parents[1] / "notebooks").glob("*.ipynb"):
        assert "Runtime.load(" in nb.read_text(), f"{nb.name} does not use the runtime"


def test_model_facts_live_only_in_the_registry():
    """No SD3.5 repo id or published architecture number is written outside models.py."""
    repo_id = re.compile(r"stabilityai/stable-diffusion-3\.5")
    arch_numbers = re.compile(r"\b(num_layers|caption_projection_dim|pos_embed_max_size|joint_attention_dim|"
                              r"d_ff|num_hidden_layers|block_out_channels)\b\W{1,4}\d")
    for path in SRC.rglob("*.py"):
        if path == SRC / "models.py":
            continue
        text = path.read_text()
        assert not repo_id.search(text), f"{path.relative_to(SRC)} names an SD3.5 repo id: use sd35.models"
        assert not arch_numbers.search(text), f"{path.relative_to(SRC)} writes an architecture number"


def test_doctor_exports_nothing_others_import():
    g = graph()
    users = {m for m, deps in g.items() if any(d.startswith("sd35.ops.doctor") for d in deps)
             and not m.startswith("sd35.ops.doctor")}
    assert users <= {"sd35.cli.doctor"}, users


def test_dotenv_is_read_in_one_place():
    readers = [p.relative_to(SRC) for p in SRC.rglob("*.py")
               if re.search(r"\bdotenv\b", p.read_text()) and p.name != "settings.py"]
    assert not readers, f".env read outside settings.py: {readers}"


def test_readme_layout_tree_names_every_module():
    """The README's layout tree is the map a newcomer reads: one line per module, each folder named, and
    nothing named there that no longer exists."""
    readme = (SRC.parents[1] / "README.md").read_text()
    tree = readme.split("## Layout", 1)[1].split("```", 2)[1]
    src_part = tree[tree.index("src/sd35/"):tree.index("src/pydevd_plugins/")]
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC)
        if path.name == "__init__.py" and rel.parent.name != "cli":
            continue
        if rel.parts[:2] == ("ops", "doctor"):  # the doctor's check groups share one line
            assert path.stem in src_part, f"README layout: the doctor line does not name {path.stem}"
            continue
        assert re.search(rf"\b{re.escape(path.name)}\b", src_part), f"README layout does not name {rel}"
        if len(rel.parts) > 1:
            assert f"{rel.parts[0]}/" in src_part, f"README layout does not name the folder {rel.parts[0]}/"
    for name in re.findall(r"([\w]+\.py)\b", src_part):
        assert any(p.name == name for p in SRC.rglob(name)), f"README layout names {name}, which does not exist"
