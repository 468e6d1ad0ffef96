"""The dependency direction of the layout: envs/ and recipes/ import ddpo_rl, never the reverse."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imported_top_levels(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_neither_envs_nor_recipes():
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_top_levels(p) & {"envs", "recipes", "benchmarks", "tests"})
        for p in (ROOT / "ddpo_rl").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 30  # the scan did find the package


def test_library_modules_do_not_import_the_package_top_level():
    """``from ddpo_rl import NAME`` inside ddpo_rl must name a submodule: the package's __init__
    imports the whole pipeline, so taking a name from it runs back up the layers."""
    package = ROOT / "ddpo_rl"
    offenders = []
    for path in package.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == package:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "ddpo_rl":
                for alias in node.names:
                    if not ((package / f"{alias.name}.py").exists() or (package / alias.name).is_dir()):
                        offenders.append(f"{path.relative_to(ROOT)}: {alias.name}")
    assert offenders == []


def test_recipe_scripts_import_what_a_plain_run_finds():
    """``python recipes/X.py`` puts recipes/ on sys.path, not the repository root: a recipe script
    imports its siblings by their own names (``from ddpo_recipe import ...``), never as
    ``recipes.X`` (which only works where a test or a tool added the root to PYTHONPATH)."""
    offenders = []
    scripts = sorted((ROOT / "recipes").glob("*.py"))
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            offenders += [f"{path.name}: {m}" for m in modules if m.split(".")[0] == "recipes"]
    assert offenders == []
    assert len(scripts) > 5  # the scan did find the recipes
