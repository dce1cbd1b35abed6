"""The package's shape, checked from its source: one owner per concept, no import cycle, data flowing one
way (settings → models / hardware / precision → load → runtime → CLI | service | notebooks | bench)."""

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


def test_data_flows_one_way():
    g = graph()
    top = {"sd35.cli", "sd35.service", "sd35.bench", "sd35.ops.doctor"}
    lower = ["sd35.settings", "sd35.models", "sd35.hardware", "sd35.precision", "sd35.hub", "sd35.tiny",
             "sd35.load", "sd35.generate", "sd35.runtime", "sd35.debug", "sd35.net", "sd35.workspace"]
    for mod in lower:
        reached = _reaches(g, mod)
        bad = {m for m in reached if any(m == t or m.startswith(t + ".") for t in top)}
        assert not bad, f"{mod} reaches up into {sorted(bad)}"
    # The first layer depends on nothing of ours but settings/errors/models.
    for mod in ("sd35.settings", "sd35.models", "sd35.net", "sd35.workspace", "sd35.errors"):
        assert _reaches(g, mod) <= {"sd35.settings", "sd35.errors", "sd35.models"}, (mod, _reaches(g, mod))
    assert "sd35.runtime" not in _reaches(g, "sd35.load")
    # Only the entry point imports the CLI.
    assert {m for m, deps in g.items() if "sd35.cli" in deps} <= {"sd35.__main__"}


def test_cli_and_worker_generate_through_the_runtime():
    for path in (SRC / "cli.py", SRC / "service" / "worker.py"):
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
        if path.name == "models.py":
            continue
        text = path.read_text()
        assert not repo_id.search(text), f"{path.relative_to(SRC)} names an SD3.5 repo id: use sd35.models"
        assert not arch_numbers.search(text), f"{path.relative_to(SRC)} writes an architecture number"


def test_doctor_exports_nothing_others_import():
    g = graph()
    doctor = "sd35.ops.doctor"
    users = {m for m, deps in g.items() if not (m == doctor or m.startswith(doctor + "."))
             and any(d == doctor or d.startswith(doctor + ".") for d in deps)}
    assert users <= {"sd35.cli"}, users


def test_dotenv_is_read_in_one_place():
    readers = [p.relative_to(SRC) for p in SRC.rglob("*.py")
               if re.search(r"\bdotenv\b", p.read_text()) and p.name != "settings.py"]
    assert not readers, f".env read outside settings.py: {readers}"
