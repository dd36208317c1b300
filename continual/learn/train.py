"""The training loop, written out in one function: mix, forward, loss + distillation + penalty, backward, clip,
step, validate, keep the best, then correct the new classes' bias."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from continual.config import Settings
from continual.learn.adapt import domain_loss, grl_lambda
from continual.learn.bias import fit_bias_correction, fold_bias_correction, new_class_mask
from continual.learn.distill import distillation_loss
from continual.learn.ewc import EwcTerm
from continual.learn.schedule import apply_phase, make_optimizer, make_scheduler, set_train_mode, warmup_factor


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run fails at once instead of writing garbage weights."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(
            f"loss is {value} at epoch {epoch + 1}, step {step}: training diverged "
            "(lower training.learning_rate / head_learning_rate or ewc_lambda, or check the inputs)"
        )


class Cancelled(Exception):
    """SIGTERM or an explicit cancel: stop now, write nothing."""


class TimeBudgetExceeded(RuntimeError):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"time budget exceeded: training.max_duration_seconds = {seconds:g}")


@dataclass
class TrainResult:
    epochs_run: int
    steps: int
    best_epoch: int  # the kept epoch: the best one; in a run that adds classes the latest within one SE of it
    validation_accuracy: float | None  # of the kept epoch; a run that adds classes: its balanced accuracy
    validation_n: int
    final_loss: float
    samples_seen: int
    train_seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    # CPU time of this process in the loop: on a shared machine it tracks the work done, not the waiting.
    train_cpu_seconds: float = 0.0
    # A run that added classes: the fitted correction ({"alpha", "beta", "n"}) or why none was fitted.
    bias_correction: dict[str, Any] | None = None

    @property
    def samples_per_s(self) -> float:
        return self.samples_seen / self.train_seconds if self.train_seconds > 0 else 0.0


@torch.inference_mode()
def accuracy_on(net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> tuple[float, int]:
    was_training = net.training
    net.eval()
    correct = n = 0
    for x, y in batches:
        with _autocast(device):
            pred = net(x.to(device, non_blocking=True)).argmax(dim=-1)
        correct += int((pred.cpu() == y).sum())
        n += len(y)
    net.train(was_training)
    return (correct / n if n else 0.0), n


def _autocast(device: torch.device) -> AbstractContextManager[object]:
    # bf16 on CUDA: the speed of half precision without fp16's loss scaling.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def train(
    model: nn.Module,
    settings: Settings,
    train_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    *,
    steps_per_epoch: int,
    device: torch.device,
    net: nn.Module | None = None,
    val_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]] | None = None,
    ewc: EwcTerm | None = None,
    teacher: nn.Module | None = None,
    n_old: int = 0,
    domain_net: nn.Module | None = None,
    target_batches: Callable[[int], Iterable[Tensor]] | None = None,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    on_progress: Callable[[dict[str, Any]], None] = lambda p: None,
    should_stop: Callable[[], None] = lambda: None,
) -> TrainResult:
    """Train ``model`` in place and leave it holding the best weights seen on the validation slice.

    ``net`` is what a batch goes through: the model itself, or ``model.head``
    when the batches are cached features of a frozen base. ``train_batches(epoch)``
    yields the epoch's mixed (new + replay) batches. ``wrap`` turns the net into
    what runs the step (DistributedDataParallel under torchrun); it is re-applied
    whenever the set of trainable parameters changes. ``should_stop`` raises
    :class:`Cancelled` or :class:`TimeBudgetExceeded`.

    A run that added classes passes ``teacher`` (the parent, taking the same
    inputs as ``net``) and ``n_old``, the parent's number of classes: every batch
    then adds ``distill_weight`` times the distillation term, and after the loop
    the new classes' logits get a bias correction fitted on the validation slice
    (``[training] bias_correction``), folded into ``model.head``.

    DANN (``[training] adaptation = "dann"``) passes ``domain_net`` and
    ``target_batches(epoch)``, unlabeled target inputs: every step then also
    embeds a target batch and adds ``[adaptation] domain_weight`` times the domain
    loss on source and target embeddings behind the gradient reversal layer, whose
    weight ramps up with training progress (:func:`continual.learn.adapt.grl_lambda`).
    With ``[training] unfreeze_schedule = "progressive"`` each newly unfrozen block
    starts with a short LR warm-up (``[adaptation] warmup_steps``).
    """
    t = settings.training
    net = model if net is None else net
    lam = t.ewc_lambda if ewc is not None and len(ewc) else 0.0
    if teacher is not None and n_old < 1:
        raise ValueError(f"a teacher needs n_old >= 1 (the parent's classes), got {n_old}")
    distill = t.distill_weight if teacher is not None else 0.0
    if teacher is not None:
        teacher.eval()
    a = settings.adaptation
    dann = domain_net is not None and target_batches is not None
    if dann and (net is not model or not isinstance(getattr(model, "backbone", None), nn.Module)):
        raise ValueError("DANN needs the model's backbone in the step: it cannot train on cached features")
    optimizer = make_optimizer(model, t)
    if dann:
        domain_net.to(device).train()  # type: ignore[union-attr]
        optimizer.add_param_group(
            {"params": list(domain_net.parameters()), "lr": t.head_learning_rate, "name": "domain"}
        )  # type: ignore[union-attr]
    total_steps = t.epochs * steps_per_epoch
    scheduler = make_scheduler(optimizer, t, steps_per_epoch=steps_per_epoch, total_steps=total_steps)

    best_acc: float | None = None  # the best score so far; the kept epoch's is kept_acc
    kept_acc: float | None = None
    best_state: dict[str, Tensor] | None = None
    best_epoch, bad_epochs, step, seen = -1, 0, 0, 0
    loss_value, val_n, train_seconds, train_cpu = float("nan"), 0, 0.0, 0.0
    history: list[dict[str, Any]] = []
    phase: tuple[str, int] | None = None
    runner = net
    unfrozen_at: int | None = None  # the step a progressive schedule last unfroze a block

    for epoch in range(t.epochs):
        # The head trains alone during the warm-up; the last blocks join afterwards.
        new_phase = apply_phase(model, settings.model, epoch, t.warmup_epochs, schedule=t.unfreeze_schedule)
        if new_phase != phase:
            if phase is not None and t.unfreeze_schedule == "progressive":
                unfrozen_at = step
            phase, runner = new_phase, wrap(net)
        set_train_mode(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if dann:
            trainable += list(domain_net.parameters())  # type: ignore[union-attr]
            target_iter = iter(target_batches(epoch))  # type: ignore[misc]
        epoch_domain = 0.0
        epoch_start, epoch_cpu, epoch_loss, epoch_steps = time.perf_counter(), time.process_time(), 0.0, 0

        for x, y in train_batches(epoch):
            should_stop()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if dann:
                # One forward over the source batch and a target batch; the domain classifier sees both
                # embeddings through the reversal layer, whose weight ramps up as training progresses.
                xt = next(target_iter, None)
                if xt is None:
                    target_iter = iter(target_batches(epoch))  # type: ignore[misc]
                    xt = next(target_iter)
                xt = xt.to(device, non_blocking=True)
                with _autocast(device):
                    emb = model.backbone(torch.cat([x, xt]))  # type: ignore[operator]
                    logits = model.head(emb[: len(x)])  # type: ignore[operator]
                loss = F.cross_entropy(logits.float(), y)
                grl = grl_lambda(step / max(1, total_steps), a.grl_weight)
                d_loss = domain_loss(domain_net, emb[: len(x)], emb[len(x) :], grl)  # type: ignore[arg-type]
                epoch_domain += float(d_loss.detach())
                loss = loss + a.domain_weight * d_loss
            else:
                with _autocast(device):
                    logits = runner(x)
                loss = F.cross_entropy(logits.float(), y)
            if distill:
                # Learning without forgetting: the parent's softened scores over its own classes on
                # this batch (new and replayed samples alike) are a target that keeps the old classes'
                # relative logits where they were while the new head rows learn.
                with torch.no_grad(), _autocast(device):
                    old_logits = teacher(x)  # type: ignore[misc]
                loss = loss + distill * distillation_loss(logits, old_logits, n_old, t.distill_temperature)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLoss(epoch, step, loss_value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if lam:
                # The EWC penalty lam/2 * sum F (theta - theta_parent)^2 pulls the weights that
                # mattered for old data back towards the parent's. Its gradient, lam * F * (theta -
                # theta_parent), is added directly: the same step as backpropagating the penalty.
                ewc.add_grad_(lam)  # type: ignore[union-attr]
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, t.grad_clip)
            if unfrozen_at is not None:
                # A block just unfrozen starts at a fraction of the base LR: its first gradients come from
                # a head tuned to the frozen features and would otherwise knock the pretrained weights about.
                f = warmup_factor(step - unfrozen_at, a.warmup_steps)
                for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=False):
                    g["lr"] = lr * f if str(g.get("name", "")).startswith("base") else lr  # base, base_no_decay
            optimizer.step()
            scheduler.step()
            step, epoch_steps, seen = step + 1, epoch_steps + 1, seen + len(y)
            epoch_loss += loss_value
            elapsed = train_seconds + time.perf_counter() - epoch_start
            on_progress(
                {
                    "phase": "training",
                    "epoch": epoch + 1,
                    "epochs": t.epochs,
                    "step": step,
                    "steps": total_steps,
                    "loss": round(loss_value, 6),
                    "samples_per_s": round(seen / elapsed, 1) if elapsed > 0 else 0.0,
                }
            )
        train_seconds += time.perf_counter() - epoch_start
        train_cpu += time.process_time() - epoch_cpu

        # Validate, keep the best weights (see `tolerance`), stop when validation stops improving.
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": epoch_loss / max(1, epoch_steps), "mode": phase[0]}
        if t.unfreeze_schedule == "progressive":
            record["unfrozen_blocks"] = phase[1] if phase[0] == "fine_tune" else ("all" if phase[0] == "all" else 0)
        if dann:
            record["domain_loss"] = epoch_domain / max(1, epoch_steps)
        if val_batches is not None:
            on_progress({"phase": "validating", "epoch": epoch + 1, "epochs": t.epochs, "step": step})
            acc, val_n = accuracy_on(net, val_batches(), device)
            record["validation_accuracy"] = acc
            tolerance = 0.0
            if teacher is not None:
                # A run that adds classes scores an epoch by its mean recall per class (the gate judges
                # class by class) and keeps the latest epoch within one standard error of the best score,
                # not the best itself: on a slice of ~20 samples a class the best of many noisy scores is
                # as often an early, half-trained epoch that got lucky (bench/classes.py measured it), and
                # a slice every epoch gets right cannot tell them apart at all.
                acc, tolerance = balanced_accuracy_on(net, val_batches(), device)
                record["validation_balanced_accuracy"], record["validation_balanced_accuracy_se"] = acc, tolerance
            improved = best_acc is None or acc > best_acc
            if improved:
                best_acc, bad_epochs = acc, 0
            else:
                bad_epochs += 1
            if improved or (teacher is not None and acc >= best_acc - tolerance):  # ties: the later epoch
                kept_acc, best_epoch = acc, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        history.append(record)
        if val_batches is not None and bad_epochs >= t.early_stopping_patience:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
    model.eval()
    bias = None
    if teacher is not None:
        bias = (
            _correct_bias(model, net, val_batches, n_old, device)
            if t.bias_correction
            else {"skipped": "[training] bias_correction = false"}
        )
    return TrainResult(
        epochs_run=len(history),
        steps=step,
        best_epoch=best_epoch + 1,
        validation_accuracy=kept_acc,
        validation_n=val_n,
        final_loss=loss_value,
        samples_seen=seen,
        train_seconds=train_seconds,
        history=history,
        train_cpu_seconds=train_cpu,
        bias_correction=bias,
    )


def balanced_accuracy_on(
    net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> tuple[float, float]:
    """The mean over classes of each class's recall (classes without samples left out), and its standard error.

    The error treats each class's recall as a binomial proportion on its own
    samples: ``sqrt(sum_c r_c (1 - r_c) / n_c) / C``.
    """
    logits, y = _logits_on(net, batches, device)
    if not len(y):
        return 0.0, 0.0
    pred = logits.argmax(dim=1)
    recall = torch.stack([(pred[y == c] == c).double().mean() for c in torch.unique(y)])
    n = torch.bincount(y)[torch.unique(y)].double()
    se = torch.sqrt((recall * (1 - recall) / n).sum()) / len(recall)
    return float(recall.mean()), float(se)


@torch.no_grad()  # not inference_mode: the bias fit backpropagates through products with these logits
def _logits_on(net: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    was_training = net.training
    net.eval()
    out, ys = [], []
    for x, y in batches:
        with _autocast(device):
            out.append(net(x.to(device, non_blocking=True)).float().cpu())
        ys.append(y)
    net.train(was_training)
    if not out:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(out), torch.cat(ys)


def _correct_bias(
    model: nn.Module,
    net: nn.Module,
    val_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]] | None,
    n_old: int,
    device: torch.device,
) -> dict[str, Any]:
    """BiC: fit ``alpha * z + beta`` on the new classes' logits over the validation slice, fold it into the head.

    The head saw every new-class sample but only a replayed share of each old
    class, so the new logits come out too large; two numbers fitted on samples
    training never used (each class weighing the same) pull them back, and
    folding them into the head's new rows means serving needs no extra step.
    """
    if val_batches is None:
        return {"skipped": "no validation slice"}
    logits, y = _logits_on(net, val_batches(), device)
    n_classes = logits.shape[1]
    is_new = y >= n_old
    if not bool(is_new.any()) or bool(is_new.all()):
        return {"skipped": f"the validation slice needs old and new classes: {int(is_new.sum())} new of {len(y)}"}
    mask = new_class_mask(n_old, n_classes)
    alpha, beta = fit_bias_correction(logits, y, mask)
    model.head = fold_bias_correction(model.head, mask, alpha, beta)  # type: ignore[assignment]
    return {"alpha": round(alpha, 6), "beta": round(beta, 6), "n": len(y)}
