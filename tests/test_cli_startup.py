"""Start-up cost: ``import leantune`` and ``leantune --help`` load neither torch nor transformers (PEP 562 lazy
public names; command modules import their heavy parts inside the functions that run a command)."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import leantune.commands

HEAVY = ("torch", "transformers")
COMMANDS = sorted(info.name for info in pkgutil.iter_modules(leantune.commands.__path__))


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def heavy_modules_after(code: str) -> list[str]:
    """The heavy modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    done = run_python(f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_leantune_is_light_and_public_names_resolve_lazily() -> None:
    assert heavy_modules_after("import leantune") == []
    done = run_python(
        "import leantune\n"
        "import leantune.train.config, leantune.methods.base\n"  # the subpackages must not shadow the functions
        "assert callable(leantune.train) and callable(leantune.methods) and 'lora' in leantune.methods()\n"
        "from leantune import LoRAConfig, wrap\n"
        "assert wrap is leantune.wrap and LoRAConfig(r=2).r == 2\n"
        "assert sorted(leantune.__all__) == sorted(n for n in leantune.__all__ if hasattr(leantune, n))\n"
    )
    assert done.returncode == 0, done.stderr


def test_unknown_attribute_is_an_attribute_error() -> None:
    import leantune

    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        leantune.nope  # noqa: B018


@pytest.mark.parametrize("command", COMMANDS)
def test_command_modules_do_not_import_torch_or_transformers(command: str) -> None:
    assert heavy_modules_after(f"import leantune.commands.{command}") == []


def test_building_the_parser_does_not_import_torch() -> None:
    assert heavy_modules_after("import leantune.cli\nleantune.cli.build_parser()") == []


def test_help_exits_zero() -> None:
    done = subprocess.run([sys.executable, "-m", "leantune", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert "usage: leantune" in done.stdout and "train" in done.stdout
