"""What ComfyUI Manager and the Comfy Registry read, and what the README promises."""
from __future__ import annotations

import ast
import re
import tomllib

from conftest import pack_module
from harness.locations import REPO_ROOT

registry = pack_module("backends.engine.registry")


def test_pyproject_has_registry_metadata():
    """Shown able to fail: the `Icon = ""` line removed from pyproject.toml's [tool.comfy]
    -> "Icon" is missing."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    project, comfy = data["project"], data["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    for key in ("name", "version", "description", "license", "requires-python", "dependencies"):
        assert project.get(key), key
    for key in ("PublisherId", "DisplayName", "Icon", "requires-comfyui"):
        assert key in comfy, key


def test_requirements_are_plain_lines_without_torch():
    """Shown able to fail: a `torch>=2.1` line added to requirements.txt -> "Manager never
    installs torch from here"."""
    lines = [l.strip() for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines
    for line in lines:
        assert not line.startswith("-"), f"pip flags are not allowed: {line}"
        assert not re.match(r"^torch(vision|audio)?\b", line), "Manager never installs torch from here"


def test_requirements_txt_installs_the_hard_dependencies_only():
    """What Manager installs (requirements.txt) is pyproject.toml's dependencies, nothing
    more: the optional backends stay extras because installing them can replace the user's
    torch (optimum-quanto requires torch>=2.6, bitsandbytes torch>=2.4; pip would fetch a
    default, on Windows CPU-only, build). No hard dependency requires torch, by the installed
    packages' own metadata.
    Shown able to fail: `optimum-quanto>=0.2.6` added to requirements.txt -> the sets differ;
    with it also added to pyproject.toml's dependencies (copies of both files: a changed
    requirements.txt makes .ci/env.sh build another environment) -> "optimum-quanto
    requires torch"."""
    from importlib import metadata
    from packaging.requirements import Requirement
    lines = [l.strip() for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(lines) == sorted(dependencies)
    for line in lines:
        name = Requirement(line).name
        pulled = [Requirement(r).name for r in metadata.requires(name) or [] if "extra ==" not in r]
        assert not any(p.startswith("torch") for p in pulled), f"{name} requires torch ({pulled})"


def test_gguf_requirement_is_stated_once_and_the_files_repeat_it_exactly():
    """pyproject.toml and requirements.txt must stay files; they state GGUF_REQUIREMENT.
    Shown able to fail: requirements.txt's line changed to `gguf>=0.11.0` -> it differs from
    'gguf>=0.10.0'."""
    requirement = pack_module("backends.gguf.library").GGUF_REQUIREMENT
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    for where, entries in (("pyproject.toml", dependencies), ("requirements.txt", lines)):
        gguf = [e.strip() for e in entries if re.match(r"\s*gguf\b", e)]
        assert gguf == [requirement], f"{where} states {gguf}, the code {requirement!r}"
    assert registry.get_adapter("gguf").pip_requirement == requirement


def test_no_backend_module_imports_comfy():
    """Shown able to fail: `import comfy.utils` (even under `if False:`) added to
    backends/gguf/library.py -> "library.py imports ['comfy.utils']"."""
    for path in (REPO_ROOT / "backends").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "comfy" or n.startswith(("comfy.", "folder_paths", "nodes")) for n in names), \
                f"{path.name} imports {names}: backends/ must stay pure torch"


def test_only_relative_imports_of_the_pack():
    """Shown able to fail: `from backends.engine import errors` added to
    backends/gguf/library.py -> the regex finds it."""
    for folder in ("backends", "nodes"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert not re.search(r"^\s*(from|import)\s+(quantkit|backends|nodes)\b", text, re.M), path


def test_readme_lists_every_format():
    """Shown able to fail: torchao's "fp8dq" renamed "fp8rowdq" in
    backends/adapters/torchao.py (README unchanged) -> torchao:fp8rowdq is not listed."""
    readme = (REPO_ROOT / "README.md").read_text()
    for fmt in registry.all_format_ids():
        backend, name = fmt.split(":")
        assert f"`{fmt}`" in readme or (f"`{backend}:" in readme and f"{name}`" in readme), fmt


def test_readme_architecture_names_every_backends_module():
    """The tree in the README's Development section lists each folder of backends/ and
    every module in it, so a reader can find a concept from the README alone. Shown able
    to fail: a module added to backends/kernels/ without a line there."""
    readme = (REPO_ROOT / "README.md").read_text()
    tree = readme.split("## Development", 1)[1].split("```", 2)[1]
    sections = re.split(r"^  (\w+)/ ", tree, flags=re.M)  # [before, name, text, name, text, ...]
    listed = {name: text for name, text in zip(sections[1::2], sections[2::2])}
    for folder in sorted(p for p in (REPO_ROOT / "backends").iterdir() if (p / "__init__.py").is_file()):
        assert folder.name in listed, f"README's tree lacks backends/{folder.name}/"
        for module in sorted(folder.glob("*.py")):
            if module.stem != "__init__":
                assert module.name in listed[folder.name], f"README's tree lacks backends/{folder.name}/{module.name}"


def test_readme_commands_are_what_ci_runs():
    """Shown able to fail (reasoned, not run: .ci/ is not edited in tests): `bash .ci/test`
    replaced in .ci/run by a direct pytest call, or the README's quick start moved below its
    30th line -> the matching assertion fails."""
    readme = (REPO_ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:30])
    assert "bash .ci/demo" in first_screen and "bash .ci/test" in first_screen
    assert "bash .ci/test" in (REPO_ROOT / ".ci" / "run").read_text()


_OUTSIDE_COMFYUI = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1] + "/tests")
from harness.comfy_inprocess import import_pack
from harness.locations import REPO_ROOT
pack = import_pack("qk_outside")
backends = sorted(".".join(p.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (REPO_ROOT / "backends").rglob("*.py"))
for name in backends:
    importlib.import_module(f"qk_outside.{name}")
print(json.dumps({"mappings": getattr(pack, "NODE_CLASS_MAPPINGS", {}), "backends": len(backends),
                  "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths")
                                     or m.startswith("qk_outside.nodes"))}))
"""


def test_pack_imports_outside_comfyui_without_its_nodes(tmp_path):
    """Imported the way ComfyUI imports it but without ComfyUI, the pack registers no
    nodes, imports nothing of nodes/ or ComfyUI, and every backends module imports.
    Shown able to fail: __init__.py importing .nodes unconditionally -> the child fails
    with "No module named 'comfy'" (and so does conftest's own import of the pack)."""
    import json
    import subprocess
    import sys
    script = tmp_path / "outside.py"
    script.write_text(_OUTSIDE_COMFYUI)
    done = subprocess.run([sys.executable, str(script), str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"mappings": {}, "backends": len(list((REPO_ROOT / "backends").rglob("*.py"))), "imported": []}


_WITHOUT_OPTIONAL_BACKENDS = r"""
import sys
for name in ("torchao", "bitsandbytes", "optimum", "optimum.quanto"):
    sys.modules[name] = None  # import fails, find_spec says: not installed
sys.path.insert(0, sys.argv[1] + "/tests")  # harness
sys.path.append(sys.argv[1])  # bench
import tempfile
from pathlib import Path
from harness.comfy_inprocess import PACK_NODES, make_base_dir, start_comfyui
nodes = start_comfyui(make_base_dir(Path(tempfile.mkdtemp(prefix="quantkit-nobackends-"))))
assert set(PACK_NODES) <= set(nodes.NODE_CLASS_MAPPINGS), "the nodes register"
from harness.tiny_models import tiny_sd3_patcher
node = nodes.NODE_CLASS_MAPPINGS["QuantKitQuantizeModel"]()
menu = node.INPUT_TYPES()["required"]["format"][0]
assert "torchao:int8wo" in menu and "gguf:Q8_0" in menu, "every format stays in the menu"
model = tiny_sd3_patcher()
assert node.quantize(model, "gguf:Q8_0", "auto")["result"][0] is not model
assert node.quantize(model, "torchao:int8dq", "auto")["result"][0] is not model  # written in torch
for fmt in ("torchao:int4wo", "bnb:nf4", "quanto:int8"):
    try:
        node.quantize(model, fmt, "auto")
    except Exception as exc:
        print("ERROR", fmt, type(exc).__name__, exc)
    else:
        raise AssertionError(f"{fmt} ran without its package")
"""


def test_pack_loads_and_quantizes_without_the_optional_backends(tmp_path):
    """torchao, bitsandbytes and optimum-quanto are optional (pyproject extras): without
    them the nodes register, GGUF formats and torchao's 8-bit schemes (written in torch)
    work, and the formats that need a package say what to install.
    Shown able to fail: an unguarded top-level `import torchao` in the pack breaks the load;
    needs_package=False dropped from torchao.py's int8dq row -> int8dq raises BackendUnavailable."""
    import os
    import subprocess
    import sys
    script = tmp_path / "no_backends.py"
    script.write_text(_WITHOUT_OPTIONAL_BACKENDS)
    done = subprocess.run([sys.executable, str(script), str(REPO_ROOT)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("ERROR")}
    for fmt, package in (("torchao:int4wo", "torchao"), ("bnb:nf4", "bitsandbytes"), ("quanto:int8", "optimum-quanto")):
        assert fmt in errors and f"pip install {package}" in errors[fmt], done.stdout[-2000:]


def test_optional_backends_are_extras_and_published_archive_is_lean():
    """Shown able to fail: the `bench/` line removed from .comfyignore -> "bench/" is not
    ignored."""
    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    hard = " ".join(data["project"]["dependencies"])
    extras = data["project"]["optional-dependencies"]
    for package in ("torchao", "bitsandbytes", "optimum-quanto"):
        assert package not in hard, f"{package} must be optional"
        assert any(package in r for r in extras["all"]), package
    assert data["project"]["classifiers"]
    ignored = (REPO_ROOT / ".comfyignore").read_text().split()
    for folder in ("tests/", "bench/", ".ci/"):
        assert folder in ignored, folder


_RUNTIME_INSTALL = re.compile(r"\bpip\b.*\binstall\b|\bensurepip\b")


def test_pack_code_has_no_eval_exec_or_runtime_install():
    """What the registry's validator looks for, over the code that ships (nodes/, backends/,
    __init__.py): no eval/exec/compile of strings, no os.system, no pip at run time
    (messages telling the user to run pip are text, not calls).
    Shown able to fail: `eval("1")` (under `if False:`) added to backends/gguf/library.py
    -> "library.py:9 calls eval"."""
    paths = [REPO_ROOT / "__init__.py", *(REPO_ROOT / "nodes").rglob("*.py"), *(REPO_ROOT / "backends").rglob("*.py")]
    for path in paths:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                builtin = isinstance(func, ast.Name) and name in ("eval", "exec", "__import__")
                shell = isinstance(func, ast.Attribute) and ast.unparse(func) == "os.system"
                assert not (builtin or shell), f"{path.name}:{node.lineno} calls {name}"
                if name in ("run", "Popen", "call", "check_call", "check_output"):
                    args = ast.unparse(node)
                    assert not _RUNTIME_INSTALL.search(args), f"{path.name}:{node.lineno} installs at run time"
        assert "import pip" not in path.read_text(), path.name
