"""The package's imports follow its floors, with no circle.

Floors, bottom up: the reference specification and plain helpers; the Triton kernels; the op
layer (and the compile check, which drives the kernels); the optimizers and ``nn``; the memory
planner and OwLore's sampler; the integrations; the command-line tools (``__main__``, the
determinism check). A module may import its own floor or any below, never one above, not even
inside a function (but a module ``__getattr__`` that keeps an old name importable). Modules of one floor import each other without a circle (module-level
imports; a child importing its own package, or a package its children, is the usual
``__init__`` pattern and does not count).
"""
import ast
import os

import lowrank_kernels

ROOT = os.path.dirname(lowrank_kernels.__file__)
FLOOR = {
    "reference": 0, "_ext": 0, "_deprecation": 0,
    "kernels": 1,
    "ops": 2, "compile_check": 2,
    "optim": 3, "nn": 3,
    "memory": 4, "owlore": 4,
    "integrations": 5,
    "__main__": 6, "_determinism": 6,
}


def _modules():
    mods = {}
    for dp, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dp, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return mods


def _imports(mod, path, mods, top_level_only):
    pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
    tree = ast.parse(open(path).read())
    # a module's ``__getattr__`` (an old name kept for users, found on first use) may reach up
    aliases = {id(x) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
               for x in ast.walk(f)}
    nodes = [n for n in ast.walk(tree) if id(n) not in aliases]
    if top_level_only:  # module-level imports, also inside a top-level if / try
        nodes = [n for top in tree.body for n in ([top] if isinstance(top, (ast.Import, ast.ImportFrom))
                                                  else list(ast.walk(top)) if isinstance(top, (ast.If, ast.Try))
                                                  else [])]
    out = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - (n.level - 1)] + ([n.module] if n.module else []))
            out.update(t for t in [base] + [f"{base}.{a.name}" for a in n.names] if t in mods)
        elif isinstance(n, ast.Import):
            out.update(a.name for a in n.names if a.name in mods)
    return {d for d in out if d != mod and not mod.startswith(d + ".") and not d.startswith(mod + ".")}


def _floor(mod):
    parts = mod.split(".")
    return FLOOR[parts[1]] if len(parts) > 1 else None


def test_every_module_has_a_floor():
    assert [m for m in _modules() if m != "lowrank_kernels" and m.split(".")[1] not in FLOOR] == []


def test_no_import_runs_up_a_floor():
    mods = _modules()
    up = [f"{m} -> {d}" for m, path in mods.items() for d in _imports(m, path, mods, False)
          if _floor(m) is not None and _floor(d) is not None and _floor(d) > _floor(m)]
    assert up == []


def test_no_import_circle():
    mods = _modules()
    edges = {m: _imports(m, p, mods, True) for m, p in mods.items()}
    state, circles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in edges[m]:
            if state.get(d) == "open":
                circles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [m])
    assert circles == []
