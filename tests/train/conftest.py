"""Smoke-run fixtures: tiny models, a few hundred images, a few dozen steps, trained once per session.

The chain is the real one: VAE -> eps and flow U-Nets on its latents -> LCM distilled from the eps U-Net.
Every trainer test skips (with the install hint) when Debian's dataset-fashion-mnist is absent.
"""

import os

import pytest

from diffrt.train import data

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGES = 256  # training images of every smoke run
needs_dataset = pytest.mark.skipif(
    not data.dataset_available(), reason=f"Fashion-MNIST not installed ({data.INSTALL_HINT})"
)


def smoke(settings, **overrides):
    """Smoke-run settings: tiny model, first IMAGES images, constant lr without warmup, CPU."""
    values = dict(size="tiny", data_limit=IMAGES, batch_size=32, warmup_steps=0, device="cpu", steps=30)
    values.update(overrides)
    for key, value in values.items():
        setattr(settings, key, value)
    return settings


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory):
    if not data.dataset_available():
        pytest.skip(f"Fashion-MNIST not installed ({data.INSTALL_HINT})")
    from diffrt.train import VAESettings, train_vae

    settings = smoke(VAESettings(), lr=3e-3, batch_size=16, steps=24, scale_images=IMAGES)
    return train_vae(tmp_path_factory.mktemp("vae") / "vae", settings, progress=False)


@pytest.fixture(scope="session")
def eps_run(tmp_path_factory, vae_run):
    from diffrt.train import DiffusionSettings, train_eps

    settings = smoke(DiffusionSettings(vae=str(vae_run.folder)), lr=2e-3)
    return train_eps(tmp_path_factory.mktemp("eps") / "fashion", settings, progress=False)


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory, vae_run):
    from diffrt.train import DiffusionSettings, train_flow

    settings = smoke(DiffusionSettings(vae=str(vae_run.folder)), lr=2e-3)
    return train_flow(tmp_path_factory.mktemp("flow") / "fashion-flow", settings, progress=False)


@pytest.fixture(scope="session")
def dit_run(tmp_path_factory, vae_run):
    from diffrt.train.dit import DiTSettings, train_dit

    settings = smoke(DiTSettings(vae=str(vae_run.folder)), lr=2e-3)
    return train_dit(tmp_path_factory.mktemp("dit") / "fashion-dit", settings, progress=False)


@pytest.fixture(scope="session")
def lcm_run(tmp_path_factory, eps_run):
    from diffrt.train import LCMSettings, train_lcm

    settings = smoke(LCMSettings(teacher=str(eps_run.folder)), lr=1e-3)
    return train_lcm(tmp_path_factory.mktemp("lcm") / "fashion-lcm", settings, progress=False)


def mean(values):
    return sum(values) / len(values)


def assert_loss_falls(losses, window=6):
    first, last = mean(losses[:window]), mean(losses[-window:])
    assert last < first, f"loss did not fall: first {window} steps {first:.4f}, last {window} {last:.4f}"
