import math

import pytest
import torch

from caspl.distill import kd_loss


def test_kd_loss_matches_hand_computation_with_tau_squared_and_batch_mean():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    tau = 2.0

    def softmax(row):
        e = [math.exp(v / tau) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        p, q = softmax(t), softmax(s)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = tau**2 * total / 2
    assert float(kd_loss(student, teacher, tau)) == pytest.approx(expected, rel=1e-6)


def test_kd_loss_is_zero_for_identical_logits_and_rejects_bad_temperature():
    logits = torch.randn(4, 5)
    assert float(kd_loss(logits, logits.clone(), 1.0)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, logits, 0.0)
