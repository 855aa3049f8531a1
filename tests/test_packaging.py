"""The declared dependency ranges hold the serving engines' pins, so the package installs beside them."""

import importlib.util
import sys

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers import ROOT


def check_versions_module():
    spec = importlib.util.spec_from_file_location("check_versions", ROOT / "scripts" / "check_versions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_declared_ranges_hold_every_engine_pin():
    deps = {
        Requirement(d).name: Requirement(d).specifier
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    engines = check_versions_module().ENGINES
    assert {name for name, _, _ in engines} == {"vLLM 0.34.0", "SGLang 0.5.23"}
    for name, torch_pin, transformers_pin in engines:
        assert Version(torch_pin) in deps["torch"], name
        assert Version(transformers_pin) in deps["transformers"], name
    assert Version("2.15.0") not in deps["torch"]  # never tested: this machine caps torch at 2.14.1
