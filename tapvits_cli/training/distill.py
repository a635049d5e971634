"""Response distillation: the student matches the teacher's temperature-softened outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch.

    The T² factor (Hinton et al., 2015) keeps the gradient scale of this term comparable
    to cross-entropy whatever the temperature, so the weight λ means the same at T=1 and T=4.
    """
    student = F.log_softmax(student_logits / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def training_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                  teacher_logits: torch.Tensor | None = None, distill_weight: float = 0.0,
                  temperature: float = 1.0) -> torch.Tensor:
    """(1 − λ)·CE(label smoothing) + λ·T²·KL; plain cross-entropy without a teacher."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if teacher_logits is None or distill_weight == 0.0:
        return loss
    return (1.0 - distill_weight) * loss + distill_weight * distillation_loss(logits, teacher_logits, temperature)
