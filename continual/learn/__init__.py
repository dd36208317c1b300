"""The continual-learning engine: data from the store, replay, EWC, the training loop, a run's life.

``run`` (spec → start → finish) drives ``candidate`` (build → train → Fisher →
write), which trains with the one loop in ``train``. Training happens in a child
process (``continual.service.worker``), started by ``launch``.
"""
