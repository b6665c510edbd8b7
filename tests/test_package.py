"""What the package promises about its own shape: a light start, a wheel that holds every subpackage, and
the public import paths (the shims of earlier paths were removed in issue 36: CHANGELOG.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_layers import ROOT, modules

LIGHT = "import sys\nfrom diffrt.cli import main\n{call}\nprint('torch' in sys.modules, 'diffusers' in sys.modules)"


@pytest.mark.parametrize("argv", [["--help"], ["samplers"], ["bench", "--help"], ["export", "--help"]])
def test_the_command_line_starts_without_importing_torch(argv):
    call = f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    out = subprocess.run([sys.executable, "-c", LIGHT.format(call=call)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout


def test_every_subpackage_is_listed_for_the_wheel():
    """An editable install finds unlisted subpackages anyway; a built wheel would silently leave them out."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert found == listed, f"listed but missing, or present but unlisted: {sorted(found ^ listed)}"


def test_the_public_import_paths_stay():
    """What users import: ``diffrt.load``, ``diffrt.Pipeline`` (loaded on first use, so ``import diffrt`` stays
    light), ``diffrt.samplers`` and ``diffrt.pipeline.Pipeline``."""
    import diffrt
    import diffrt.pipeline
    from diffrt import samplers

    assert diffrt.Pipeline is diffrt.pipeline.Pipeline and callable(diffrt.load)
    assert {"sample", "prepare", "run", "from_diffusers", "available"} <= set(samplers.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        diffrt.nothing  # noqa: B018


def test_the_clis_light_lists_match_the_registries():
    from diffrt import backends
    from diffrt.core import defaults
    from diffrt.models import embedded

    assert tuple(backends.names()) == defaults.BACKENDS
    assert embedded.NAMES == defaults.EMBEDDED_MODELS


def test_python_started_in_the_repository_root_still_gets_hugging_faces_kernels():
    """``python -m diffrt.cli`` (or a notebook) in the checkout puts its root on sys.path, where the ``kernels/``
    folder (diffrt.kernels) would shadow Hugging Face's ``kernels``, which transformers imports; the folder hands
    the name over to that package."""
    import importlib.machinery
    import os

    if importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if p and p != str(ROOT)]) is None:
        pytest.skip("Hugging Face's kernels package is not installed")
    code = ("import kernels, diffrt.kernels; print(kernels.__file__); print(diffrt.kernels.__file__); "
            "import transformers.integrations.hub_kernels")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # the root on the path, as for a user
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hub, ours = proc.stdout.split()
    assert not hub.startswith(str(ROOT)) and ours == str(ROOT / "kernels" / "__init__.py")


def test_the_tier_table_names_test_files_that_exist():
    from tests.conftest import MODULE_TIERS, TIERS

    tests = ROOT / "tests"
    assert set(MODULE_TIERS.values()) <= set(TIERS)
    missing = [path for path in MODULE_TIERS if not (tests / path).exists()]
    assert not missing, f"tests/conftest.py names test files that are not there: {missing}"
