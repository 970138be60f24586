import pytest
import torch
from torch.nn import functional as F

from steindiff.bench.metrics import frechet_distance, load_classifier, score_digits, split_indices
from steindiff.denoisers.empirical import load_mnist


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def test_frechet_distance_closed_form():
    d, m = 6, torch.arange(6, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    assert frechet_distance(m, eye, m, eye) == pytest.approx(0, abs=1e-9)
    # N(0, I) vs N(m, 4I): ||m||^2 + d (1 + 4 - 2 * 2)
    assert frechet_distance(torch.zeros(d), eye, m, 4 * eye) == pytest.approx(float(m @ m) + d)


@pytest.mark.slow
def test_classifier_reaches_its_reported_held_out_accuracy(classifier):
    images, labels = load_mnist()
    _, held = split_indices(labels)
    with torch.no_grad():
        accuracy = float((classifier.model(images[held]).argmax(1) == labels[held]).float().mean())
    assert accuracy == pytest.approx(classifier.facts["held_out_accuracy"], abs=1e-6)
    assert accuracy >= 0.95 and len(held) == 500


@pytest.mark.slow
def test_fd_orders_data_blur_and_noise(classifier):
    images = load_mnist()[0]
    subset = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1000]]
    kernel = torch.ones(1, 1, 5, 5) / 25
    blurred = F.conv2d(F.pad(subset, (2, 2, 2, 2), value=-1.0), kernel)
    noise = torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    real, blur, rand = (score_digits(x, classifier) for x in (subset, blurred, noise))
    assert abs(score_digits(images, classifier).fd) < 1e-3  # the reference statistics are these 5,000 digits
    assert real.fd < 20 and real.confidence > 0.95  # 1,000 of them: the finite-sample floor
    assert real.fd < blur.fd < rand.fd
    assert blur.fd > 20 * real.fd and rand.fd > 200 * real.fd
    assert sum(real.class_counts) == 1000


@pytest.mark.slow
def test_non_finite_samples_are_scored_not_crashed(classifier):
    x = load_mnist()[0][:10].clone()
    x[0] = float("nan")
    assert score_digits(x, classifier).samples == 10
    with pytest.raises(ValueError, match="at least 2 samples"):
        score_digits(x[:1], classifier)
