"""The layers of docs/architecture.md, checked on the code: no import points from a lower layer to a higher one,
and no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ["core", "data", "models", "runtime", "evaluation", "training", "deploy", "serve", "api", "cli"]
TOP_LEVEL_LAYER = {"api": "api", "demo": "api", "__init__": "api", "__main__": "cli"}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    if parts[1] in LAYERS:
        return parts[1]
    return TOP_LEVEL_LAYER[parts[1]]


def imports_of(path: Path, src: Path = SRC) -> set[str]:
    """classforge modules imported anywhere in the file (module top or inside functions)."""
    mod = module_name(path, src)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "classforge"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "classforge":
                continue
            for a in node.names:  # `from classforge.runtime import embeddings` imports a module
                sub = src / f"{base}.{a.name}".replace(".", "/")
                found.add(f"{base}.{a.name}" if sub.with_suffix(".py").exists() or sub.is_dir() else base)
    return found


def graph(src: Path = SRC) -> dict[str, set[str]]:
    files = {module_name(p, src): p for p in src.joinpath("classforge").rglob("*.py")}
    return {m: {i for i in imports_of(p, src) if i in files and i != m} for m, p in files.items()}


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return sorted(f"{m} ({layer_of(m)}) imports {i} ({layer_of(i)})" for m, deps in g.items() for i in deps
                  if rank[layer_of(i)] > rank[layer_of(m)])


def test_every_module_belongs_to_a_layer():
    for m in graph():
        assert layer_of(m) in LAYERS, m


def test_no_import_points_up_the_layers():
    upward = upward_imports(graph())
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_walk_finds_an_upward_import_inside_a_function(tmp_path):
    """On a small fake tree: a data module that imports training inside a function is reported."""
    pkg = tmp_path / "classforge"
    for rel, text in {"__init__.py": "", "data/__init__.py": "", "training/__init__.py": "",
                      "data/split.py": "def f():\n    from classforge.training.run import train\n",
                      "training/run.py": "from classforge.data import split\n\ndef train():\n    pass\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    g = graph(tmp_path)
    assert g["classforge.training.run"] == {"classforge.data.split"}
    assert upward_imports(g) == ["classforge.data.split (data) imports classforge.training.run (training)"]


def test_commands_use_only_the_public_api_the_console_and_the_config():
    allowed = ("classforge.api", "classforge.cli", "classforge.core")
    leaks = sorted(f"{m} imports {i}" for m, deps in graph().items() if m.startswith("classforge.cli")
                   for i in deps if not i.startswith(allowed))
    assert not leaks, "\n".join(leaks)


def test_image_training_imports_no_audio_extra_and_no_lightning():
    """soundfile/soxr belong to the audio extra and must not be needed for images; Lightning loads only for the
    strategies that train the network (a linear run never pays for its imports)."""
    import subprocess
    import sys

    code = ("import sys, classforge.training.run, classforge.runtime.predictor, classforge.serve.api; "
            "print(sorted(m for m in ('soundfile', 'soxr', 'lightning', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
