"""What the package promises about its own shape: a light start, a wheel that holds every subpackage, and
earlier import paths that keep working after the architecture rework (issue 12)."""

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


EARLIER_NAMES = [  # (earlier module, name) -> (where it lives now, name)
    (("diffrt.export.artifacts", "model_hash"), ("diffrt.artifacts", "model_hash")),
    (("diffrt.export.artifacts", "atomic_write_json"), ("diffrt.files", "atomic_write_json")),
    (("diffrt.export.modules", "UNetGraph"), ("diffrt.families.base", "UNetGraph")),
    (("diffrt.export.onnx_export", "session_options"), ("diffrt.backends.onnxruntime_backend", "session_options")),
    (("diffrt.pipeline", "resolve_device_dtype"), ("diffrt.devices", "resolve_device_dtype")),
    (("diffrt.pipeline", "OUTPUT_TYPES"), ("diffrt.images", "OUTPUT_TYPES")),
    (("diffrt.samplers.base", "register"), ("diffrt.samplers.registry", "register")),
    (("diffrt.bench.samplers", "steps_for_nfe"), ("diffrt.bench.sampler_configs", "steps_for_nfe")),
    (("diffrt.bench.samplers", "energy_distance"), ("diffrt.bench.oracle", "energy_distance")),
    (("diffrt.train.text", "load_text_encoder"), ("diffrt.minilm", "load_text_encoder")),
    (("diffrt.loading", "Components"), ("diffrt.components", "Components")),
]


@pytest.mark.parametrize(("earlier", "now"), EARLIER_NAMES, ids=lambda pair: ".".join(pair))
def test_earlier_import_paths_still_give_the_same_objects(earlier, now):
    import importlib

    assert getattr(importlib.import_module(earlier[0]), earlier[1]) is getattr(importlib.import_module(now[0]), now[1])


def test_earlier_tables_are_read_off_the_families():
    from diffrt import loading

    assert loading.FAMILIES["StableDiffusionXLInpaintPipeline"] == "sdxl"
    assert loading.FAMILIES["LatentConsistencyModelPipeline"] == "sd"
    assert loading.TEXT_ENCODER_CLASSES == ("CLIPTextModel", "CLIPTextModelWithProjection", "BertModel",
                                            "T5EncoderModel")


def test_names_moved_above_their_old_layer_say_where_they_went():
    import diffrt.export
    import diffrt.pipeline

    with pytest.raises(AttributeError, match=r"moved to diffrt\.bench\.stages\.stage_latency"):
        diffrt.export.stage_latency  # noqa: B018
    with pytest.raises(AttributeError, match=r"moved to diffrt\.api\.load"):
        diffrt.pipeline.load_pipeline  # noqa: B018
    with pytest.raises(ImportError, match=r"moved to diffrt\.bench\.stages"):
        import diffrt.export.bench  # noqa: F401


def test_the_clis_light_lists_match_the_registries():
    from diffrt import backends, defaults, embedded

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
