import numpy as np
import pytest
import torch

from runtime.evaluate import evaluate, score, torch_variant


def test_score_against_labels_and_reference():
    labels = np.array([0, 1, 2, 3])
    ref = np.eye(4) * 5.0                       # always right
    var = ref.copy()
    var[3] = [0, 0, 9, 1]                       # wrong on the last image, 2nd choice right
    s = score(var, labels, ref)
    assert s.top1 == 0.75 and s.top5 == 1.0 and s.agreement == 0.75
    assert 0 < s.cosine < 1 and s.kl > 0
    same = score(ref, labels, ref)
    assert same.agreement == 1.0 and same.cosine == pytest.approx(1.0) and same.kl == pytest.approx(0.0, abs=1e-12)


def test_score_rejects_non_finite_logits():
    with pytest.raises(ValueError, match="non-finite"):
        score(np.array([[np.nan, 0.0]]), np.array([0]))


def test_evaluate_streams_batches_for_all_variants():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    x = torch.randn(10, 6)
    y = model(x).argmax(1)
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    noisy = torch.nn.Linear(6, 3)
    scores = evaluate({"dense": torch_variant(model), "other": torch_variant(noisy)}, loader,
                      reference="dense", progress=False)
    assert scores["dense"].top1 == 1.0 and scores["dense"].agreement is None
    assert scores["other"].n == 10 and scores["other"].agreement == scores["other"].top1


def test_evaluate_refuses_unlabelled_images():
    with pytest.raises(ValueError, match="unlabelled"):
        evaluate({"m": lambda x: np.zeros((2, 3))}, [(torch.zeros(2, 6), torch.tensor([-1, -1]))],
                 progress=False)
