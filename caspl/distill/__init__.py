"""Distillation from the teacher CLIP: the KD loss, teacher text features, teacher actors and the logits cache."""

from caspl.distill.loss import kd_loss

__all__ = ["kd_loss"]
