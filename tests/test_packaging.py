"""What ComfyUI Manager and the Comfy Registry read, and what the README promises."""
from __future__ import annotations

import ast
import re
import tomllib

from conftest import pack_module
from harness.locations import REPO_ROOT

registry = pack_module("backends.registry")


def test_pyproject_has_registry_metadata():
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    for key in ("name", "version", "description", "license", "requires-python", "dependencies"):
        assert project.get(key), key
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy, key


def test_requirements_are_plain_lines_without_torch():
    lines = [l.strip() for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines
    for line in lines:
        assert not line.startswith("-"), f"pip flags are not allowed: {line}"
        assert not re.match(r"^torch(vision|audio)?\b", line), "Manager never installs torch from here"


def test_backends_never_import_comfy():
    for path in (REPO_ROOT / "backends").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "comfy" or n.startswith(("comfy.", "folder_paths", "nodes")) for n in names), \
                f"{path.name} imports {names}: backends/ must stay pure torch"


def test_only_relative_imports_of_the_pack():
    for folder in ("backends", "nodes"):
        for path in (REPO_ROOT / folder).glob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import)\s+(quantkit|backends|nodes)\b", text, re.M), path


def test_readme_lists_every_format():
    readme = (REPO_ROOT / "README.md").read_text()
    for fmt in registry.all_format_ids():
        backend, name = fmt.split(":")
        assert f"`{fmt}`" in readme or (f"`{backend}:" in readme and f"{name}`" in readme), fmt


def test_readme_commands_are_what_ci_runs():
    readme = (REPO_ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:30])
    assert "bash .ci/demo" in first_screen and "bash .ci/test" in first_screen
    assert "bash .ci/test" in (REPO_ROOT / ".ci" / "run").read_text()
