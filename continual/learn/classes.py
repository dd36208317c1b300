"""Which classes a run's model has: the parent's, in their order, plus the new ones that are ready.

Pure functions over the parent's class list, the configured one and the store's
per-class counts (``store.classes.rows()``). A class never moves: a new one is
appended, so an old class keeps its head row and its index for life. A class is
*ready* (trainable) once it has ``[triggers] min_class_samples`` train-split and
``min_class_holdout`` holdout samples: before that the gate could not measure its
recall, and its samples are left out of training like any unknown label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from continual.config import Settings, TriggerSettings


class ClassCount(Protocol):
    """A label with its samples per split (``continual.store.ClassRow`` is one)."""

    label: str
    train: int
    holdout: int


class ClassesChanged(ValueError):
    """The configured classes remove or reorder the parent's: only appending is allowed."""

    def __init__(self, parent: str, parent_classes: Sequence[str], configured: Sequence[str]) -> None:
        self.parent, self.parent_classes, self.configured = parent, tuple(parent_classes), tuple(configured)
        super().__init__(
            f"the parent version {parent} has classes {list(parent_classes)} but [model] classes = "
            f"{list(configured)}: classes can only be appended (a class keeps its index for life); "
            "removing or reordering classes needs a new bootstrap model"
        )


@dataclass(frozen=True)
class ClassPlan:
    """The run's class list: ``base`` (the parent's, or the configured ones at bootstrap) then ``added``."""

    base: tuple[str, ...]
    added: tuple[str, ...]
    # New classes with samples that are not ready yet (or beyond max_classes): left out of this run.
    waiting: tuple[str, ...] = ()

    @property
    def classes(self) -> tuple[str, ...]:
        return (*self.base, *self.added)


def is_ready(train: int, holdout: int, triggers: TriggerSettings) -> bool:
    """Enough train samples to learn the class and enough holdout samples for the gate to judge it."""
    return train >= triggers.min_class_samples and holdout >= triggers.min_class_holdout


def new_class_counts(known: Sequence[str], counts: Sequence[ClassCount], settings: Settings) -> list[ClassCount]:
    """Classes with samples that ``known`` lacks and the label policy lets in, in joining order.

    Configured classes come first (in their order: an operator appended them to
    ``[model] classes``), then, with ``new_classes = "accept"``, feedback labels in
    the order the store first saw them.
    """
    m = settings.model
    have = set(known)
    by_label = {c.label: c for c in counts}
    configured = [by_label[c] for c in m.classes if c not in have and c in by_label]
    accepted = [c for c in counts if c.label not in have and c.label not in set(m.classes)]
    return [*configured, *(accepted if m.new_classes == "accept" else [])]


def plan_classes(
    parent: str | None, parent_classes: Sequence[str] | None, counts: Sequence[ClassCount], settings: Settings
) -> ClassPlan:
    """The class list of a run from ``parent`` (None: bootstrap from the configured classes).

    Raises :class:`ClassesChanged` when ``[model] classes`` and the parent's list
    disagree on a class's place (one removed or reordered); either may extend the other.
    """
    configured = tuple(settings.model.classes)
    if parent_classes is None:
        base = configured
    else:
        base = tuple(parent_classes)
        n = min(len(base), len(configured))
        if base[:n] != configured[:n]:
            raise ClassesChanged(parent or "?", base, configured)
    candidates = new_class_counts(base, counts, settings)
    ready = [c.label for c in candidates if is_ready(c.train, c.holdout, settings.triggers)]
    room = max(0, settings.model.most_classes - len(base))
    added = tuple(ready[:room])
    waiting = tuple(c.label for c in candidates if c.label not in added)
    return ClassPlan(base=base, added=added, waiting=waiting)
