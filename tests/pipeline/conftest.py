import pytest

import diffrt


@pytest.fixture(scope="session")
def tiny():
    return diffrt.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny):
    from diffrt.loading import save_components

    return save_components(tiny.components, tmp_path_factory.mktemp("tiny") / "tiny")
