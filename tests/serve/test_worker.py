"""What a replica and a batch worker do to start (diffrt.serve.worker), without Ray: the pipeline with the
backend's options as the command line gives them, and the defaults a request leaves out."""

from types import SimpleNamespace

import pytest

from diffrt.serve.worker import start_pipeline


def settings(backend: str) -> SimpleNamespace:
    return SimpleNamespace(model="tiny", backend=backend, device="cpu", dtype=None)


def test_a_worker_loads_its_pipeline_and_the_models_defaults():
    pipe, resolved = start_pipeline(settings("torch"), threads=None)
    assert pipe.backend.name == "torch"
    assert resolved == {**pipe.defaults, "width": pipe.default_size, "height": pipe.default_size}


def test_backend_options_reach_the_backend():
    with pytest.raises(ValueError, match=r"option\(s\) \['aot'\] do not apply to the torch backend"):
        start_pipeline(settings("torch:aot=true"), threads=None)
    with pytest.raises(ValueError, match="aot must be True or False, got 'maybe'"):
        start_pipeline(settings("compile:aot=maybe"), threads=None)
