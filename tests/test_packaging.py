"""Checks on the packaging and CI files that nothing else would catch before a release.

A missing ``py.typed``, a console script pointing at the wrong function, a tox env that lets pip
pull a multi-GB CUDA torch, or a README whose test command drifted from CI all go unnoticed by
the library's own tests. These read the files as text; nothing is built or installed.
"""

from __future__ import annotations

import configparser
import importlib.resources
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CI_SCRIPT = ROOT / ".ci" / "run"
TORCH_PIN = "torch==2.13.0"


def _read_config(name: str) -> configparser.ConfigParser:
    # Raw parsing: tox's `{posargs}` and pip's `>=` are not interpolation syntax.
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / name, encoding="utf-8")
    return config


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def _ci_commands() -> list[str]:
    lines = CI_SCRIPT.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_py_typed_marker_is_in_the_source_tree_and_declared() -> None:
    assert (ROOT / "ckpt_callbacks" / "py.typed").is_file()
    package_data = _read_config("setup.cfg")["options.package_data"]["ckpt_callbacks"]
    assert "py.typed" in _lines(package_data)


def test_py_typed_marker_ships_with_the_imported_package() -> None:
    # Under tox this is the installed wheel, so it proves the marker is packaged.
    assert importlib.resources.files("ckpt_callbacks").joinpath("py.typed").is_file()


def test_console_script_targets_cli_main() -> None:
    scripts = _read_config("setup.cfg")["options.entry_points"]["console_scripts"]
    entries = {}
    for line in _lines(scripts):
        name, target = line.split("=", 1)
        entries[name.strip()] = target.strip()
    assert entries == {"ckpt-callbacks": "ckpt_callbacks.cli:main"}


def test_all_extra_is_the_union_of_zstd_lz4_and_s3() -> None:
    extras = _read_config("setup.cfg")["options.extras_require"]
    union = {req for name in ("zstd", "lz4", "s3") for req in _lines(extras[name])}
    assert set(_lines(extras["all"])) == union


def test_every_tox_env_installs_pinned_cpu_torch_first() -> None:
    tox = _read_config("tox.ini")
    # tox installs `deps` before the package; env sections inherit them from [testenv].
    for section in (s for s in tox.sections() if s.startswith("testenv")):
        deps = _lines(tox[section].get("deps", tox["testenv"]["deps"]))
        assert deps[0] == TORCH_PIN, f"[{section}] must install {TORCH_PIN} first"


def test_ci_script_is_executable_valid_bash_and_pins_torch_before_tox() -> None:
    assert CI_SCRIPT.stat().st_mode & 0o111, ".ci/run must be executable"
    bash = shutil.which("bash")
    if bash is not None:
        subprocess.run([bash, "-n", str(CI_SCRIPT)], check=True)
    commands = _ci_commands()
    torch_install = next(i for i, c in enumerate(commands) if f"install {TORCH_PIN}" in c)
    tox_run = next(i for i, c in enumerate(commands) if c.endswith("tox"))
    assert torch_install < tox_run


def test_last_ci_command_is_the_readme_test_command() -> None:
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not written yet")
    last = _ci_commands()[-1]
    assert last in readme.read_text(encoding="utf-8"), f"README.md must show {last!r}"
