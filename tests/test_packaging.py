"""Packaging: pyproject.toml declares what the code imports (and no test tools at run time),
requirements.txt is its dependencies plus the development extras, constraints.txt pins every
installed version but torch (and the installed environment matches it), the install script and
the conda file use the pins, and the console scripts start the stages."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DEV_EXTRAS = ("test", "plots", "notebooks", "wandb")
LOCAL = {"lingua", "apps", "setup", "plots", "tests"}


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9_.\-]+)", req).group(1)).lower()


def _spec(req: str) -> tuple[str, str]:
    req = req.split("#")[0].strip()
    return _name(req), req[len(re.match(r"[A-Za-z0-9_.\-]+", req).group(0)):].strip()


def _requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def _pins() -> dict[str, str]:
    pins = {}
    for line in _requirement_lines(REPO / "constraints.txt"):
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin"
        pins[_name(name)] = version
    return pins


def test_runtime_dependencies_hold_no_test_tools_and_extras_exist():
    runtime = {_name(r) for r in PROJECT["dependencies"]}
    assert not runtime & {"pytest", "hypothesis", "wandb", "matplotlib", "nbformat", "ipykernel", "vllm"}
    extras = PROJECT["optional-dependencies"]
    assert {"test", "hf-eval", "wandb", "plots", "notebooks", "vllm"} <= set(extras)
    assert {"pytest", "hypothesis"} <= {_name(r) for r in extras["test"]}
    assert "accelerate" in {_name(r) for r in extras["hf-eval"]}


def test_requirements_txt_is_the_dependencies_plus_the_development_extras():
    declared = {_spec(r) for r in PROJECT["dependencies"] if _name(r) != "torch"}
    for extra in DEV_EXTRAS:
        declared |= {_spec(r) for r in PROJECT["optional-dependencies"][extra]}
    assert {_spec(r) for r in _requirement_lines(REPO / "requirements.txt")} == declared


def _imported_top_level_modules() -> set[str]:
    names = set()
    for folder in ("lingua", "apps", "setup", "plots"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - LOCAL


def test_every_imported_package_is_declared():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    for reqs in PROJECT["optional-dependencies"].values():
        declared |= {_name(r) for r in reqs}
    providers = metadata.packages_distributions()
    missing = {}
    for module in sorted(_imported_top_level_modules()):
        dists = {_name(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing[module] = sorted(dists) or "not installed"
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "pyarrow" in {_name(r) for r in PROJECT["dependencies"]}


def test_constraints_pin_every_requirement_but_torch_and_match_the_installed_versions():
    pins = _pins()
    assert "torch" not in pins and _name(PROJECT["name"]) not in pins
    for req in _requirement_lines(REPO / "requirements.txt"):
        assert _name(req) in pins, f"{req}: not pinned in constraints.txt"
        assert metadata.version(_name(req)) == pins[_name(req)], req
    drifted = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # a constraint, not a requirement (the requirements are checked above to be pinned)
        if installed != version:
            drifted[name] = (version, installed)
    assert not drifted, f"installed versions differ from constraints.txt (pinned, installed): {drifted}"


def test_install_script_and_conda_file_use_the_pins():
    install = (REPO / "setup" / "install.sh").read_text()
    assert install.count("-c constraints.txt") == 2  # requirements, then the project
    assert "cat requirements.txt constraints.txt pyproject.toml" in install  # a new pin reinstalls
    torch_default = re.search(r"TORCH_VERSION:-([0-9.]+)", install).group(1)
    conda = (REPO / "environment.yaml").read_text()
    assert f"torch=={torch_default}" in conda and "-c constraints.txt" in conda and "-r requirements.txt" in conda
    assert f">={torch_default}" in next(r for r in PROJECT["dependencies"] if _name(r) == "torch")


@pytest.mark.parametrize("script", sorted(PROJECT["scripts"]))
def test_console_scripts_point_at_entry_points(script):
    module, _, attr = PROJECT["scripts"][script].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_installed_console_script_starts_a_stage():
    exe = Path(sys.executable).parent / "bolt-train"
    if not exe.exists():
        pytest.skip("the project is not installed in this interpreter's environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Defaults of BoltTrainArgs" in out.stdout
