"""Learning without forgetting: distil the parent's old-class predictions into the candidate.

When the head grows, a new class's row pulls every old logit down on the new
data, and nothing in the cross-entropy on new samples tells the network what
the old classes looked like. The parent still knows: its softened
distribution over the old classes on the same batch is a target that keeps the
old classes' relative scores (the "dark knowledge" of which old class a sample
resembles) where they were (Li & Hoiem, "Learning without Forgetting", 2016).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, n_old: int, temperature: float = 2.0) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over the first ``n_old`` logits, batch mean.

    Only the old classes' logits count: the teacher (the parent) has no opinion
    on the new classes, and renormalising both distributions over the old
    classes leaves the new rows free to learn. The ``T²`` factor (Hinton et
    al., 2015) keeps the term's gradient on the same scale as the
    cross-entropy's whatever the temperature, so ``distill_weight`` need not be
    retuned when ``T`` changes. The teacher is detached: no gradient reaches
    the parent. Computed in float32 (the loop may run under bf16 autocast).

    The training loop adds it on every batch (new and replayed samples alike)::

        with torch.no_grad():
            teacher = parent(x)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + distill_weight * distillation_loss(logits[:, :n_old], teacher, n_old, T)

    Exactly zero when the student's old logits equal the teacher's:

    >>> import torch
    >>> z = torch.tensor([[1.0, -2.0, 0.5]])
    >>> float(distillation_loss(z, z, n_old=3))
    0.0
    >>> float(distillation_loss(torch.tensor([[0.0, 0.0, 9.0]]), torch.tensor([[5.0, 0.0]]), n_old=2)) > 0
    True
    """
    if n_old < 1:
        raise ValueError(f"n_old must be >= 1, got {n_old}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.ndim != 2 or teacher_logits.ndim != 2:
        raise ValueError(
            f"logits must be [batch, classes]; got student {list(student_logits.shape)}, "
            f"teacher {list(teacher_logits.shape)}"
        )
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(
            f"student and teacher batches differ: {student_logits.shape[0]} vs {teacher_logits.shape[0]} samples"
        )
    if student_logits.shape[1] < n_old or teacher_logits.shape[1] < n_old:
        raise ValueError(
            f"n_old = {n_old} but student has {student_logits.shape[1]} and teacher {teacher_logits.shape[1]} logits"
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0  # an empty batch: zero, still attached to the graph
    log_s = F.log_softmax(student_logits[:, :n_old].float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits[:, :n_old].detach().float() / temperature, dim=1)
    # sum_c p_t (log p_t - log p_s); with log targets the term is exactly 0 where log_t == log_s.
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")
    return kl * temperature**2
