"""Quality metrics: torchmetrics FID/KID over custom features, adherence, reference files, Inception path."""

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from diffrt.bench import quality
from diffrt.models.fashion import classifier as fashion_classifier


class Identity(nn.Module):
    """Feature "network" that passes features through: the images *are* the features."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.double()


def gaussian(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def sample_stats(x):
    return x.mean(0).numpy(), np.cov(x.numpy(), rowvar=False)


def closed_form_fid(a, b):
    from scipy import linalg

    (mu1, s1), (mu2, s2) = sample_stats(a), sample_stats(b)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_identical_sets_is_zero():
    x = gaussian(1000, 16, seed=0)
    assert abs(quality.frechet_distance(x, Identity(16), real=x)) < 1e-6


def test_fid_of_shifted_and_scaled_gaussians_is_the_closed_form():
    x = gaussian(2000, 8, seed=1)
    shift = torch.linspace(-1, 1, 8, dtype=torch.float64)
    y = 2 * x + shift
    # sample covariances: S_y = 4 S_x, so sqrt(S_x S_y) = 2 S_x and FID = |mu_x - mu_y|^2 + tr(S_x)
    mu_x, s_x = sample_stats(x)
    exact = float(((mu_x - (2 * mu_x + shift.numpy())) ** 2).sum() + np.trace(s_x))
    assert quality.frechet_distance(y, Identity(8), real=x) == pytest.approx(exact, abs=1e-6)
    # pure shift: FID = |shift|^2
    assert quality.frechet_distance(x + shift, Identity(8), real=x) == pytest.approx(float(shift @ shift), abs=1e-6)


def test_fid_matches_scipy_for_unrelated_gaussians():
    a = gaussian(1500, 6, seed=2)
    b = gaussian(1500, 6, seed=3, scale=torch.linspace(0.5, 2, 6, dtype=torch.float64), shift=0.3)
    assert quality.frechet_distance(b, Identity(6), real=a) == pytest.approx(closed_form_fid(a, b), abs=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    a, b = gaussian(600, 8, seed=4), gaussian(600, 8, seed=5)
    same, _ = quality.kernel_distance(b, Identity(8), real=a, subsets=20, subset_size=300)
    shifted, _ = quality.kernel_distance(b + 1.0, Identity(8), real=a, subsets=20, subset_size=300)
    assert abs(same) < 0.01 < shifted
    again, _ = quality.kernel_distance(b + 1.0, Identity(8), real=a, subsets=20, subset_size=300)
    assert again == shifted  # subsets come from a seeded RNG


# ----------------------------------------------------------------------------- with a classifier


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    model = fashion_classifier.FashionClassifier(widths=(8, 16, 16), num_features=16)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so features depend on eval mode
        model(torch.rand(64, 3, 32, 32))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(120, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_adherence_on_known_labels(classifier, images):
    predicted = quality.predict(images, classifier)
    assert predicted.shape == (120,) and predicted.dtype == torch.int64
    assert quality.adherence(images, predicted, classifier) == 1.0
    assert quality.adherence(images, (predicted + 1) % 10, classifier) == 0.0
    half = torch.where(torch.arange(120) < 60, predicted, (predicted + 1) % 10)
    assert quality.adherence(images, half, classifier) == 0.5


def test_adherence_rejects_bad_input(classifier, images):
    with pytest.raises(ValueError, match="120 images but 3 labels"):
        quality.adherence(images, [0, 1, 2], classifier)
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        quality.predict(torch.rand(2, 1, 28, 28), classifier)
    with pytest.raises(ValueError, match="float tensor"):
        quality.predict((images * 255).byte(), classifier)


def test_reference_file_reproduces_the_direct_fid(classifier, images, tmp_path):
    real, fake = images[:80], images[80:].flip(-1)
    reference = fashion_classifier.reference_statistics(classifier, real, kid_rows=50)
    path = fashion_classifier.save_reference(tmp_path / "ref.safetensors", reference)
    loaded = fashion_classifier.load_reference(path, classifier=classifier)
    assert loaded["kid_features"].shape == (50, 16) and loaded["kid_features"].dtype == torch.float16
    direct = quality.frechet_distance(fake, fashion_classifier.FeatureNet(classifier), real=real)
    assert quality.domain_fid(fake, classifier, loaded) == pytest.approx(direct, rel=1e-9)
    assert quality.domain_fid(real, classifier, loaded) == pytest.approx(0.0, abs=1e-6)
    kid_mean, kid_std = quality.domain_kid(fake, classifier, loaded, subsets=5, subset_size=30)
    assert np.isfinite(kid_mean) and kid_std >= 0


def test_reference_of_another_classifier_is_refused(classifier, images, tmp_path):
    statistics = fashion_classifier.reference_statistics(classifier, images)
    path = fashion_classifier.save_reference(tmp_path / "ref.safetensors", statistics)
    other = fashion_classifier.FashionClassifier(widths=(8, 16, 16), num_features=16).eval()
    with pytest.raises(ValueError, match="different classifier"):
        fashion_classifier.load_reference(path, classifier=other)


def test_classifier_round_trip_and_clear_errors(classifier, images, tmp_path):
    folder = fashion_classifier.save_classifier(classifier, tmp_path / "clf")
    loaded = fashion_classifier.load_classifier(folder)
    torch.testing.assert_close(loaded(images), classifier(images), rtol=0, atol=0.05)  # float16 storage
    with pytest.raises(FileNotFoundError, match="diffrt train classifier"):
        fashion_classifier.load_classifier(tmp_path / "missing")
    weights = folder / fashion_classifier.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="could not load the classifier"):
        fashion_classifier.load_classifier(folder)
    with pytest.raises(FileNotFoundError, match="reference statistics"):
        fashion_classifier.load_reference(tmp_path / "none.safetensors")


def test_feature_net_stays_in_eval_mode_inside_the_metric(classifier, images):
    net = fashion_classifier.FeatureNet(classifier)
    metric = fashion_classifier.fid_metric(net)
    metric.train()
    assert not classifier.training
    assert net(images[:4]).dtype == torch.float64 and net(images[:4]).shape == (4, 16)


# ------------------------------------------------------------------------------------ Inception


def test_inception_fid_without_weights_file_names_it(tmp_path, images):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        quality.inception_fid(images, images, tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="Inception weights file"):
        quality.inception_fid(images, images, None)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_fid_without_torch_fidelity_names_the_package(tmp_path, images):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not used")
    with pytest.raises(ModuleNotFoundError, match="pip install torch-fidelity"):
        quality.inception_fid(images, images, weights)
