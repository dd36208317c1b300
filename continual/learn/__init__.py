"""The continual-learning engine: data from the store, replay, EWC, the training loop and the worker.

Importing this package imports nothing heavy: the service uses :mod:`continual.learn.launch`
and :mod:`continual.learn.runs` without loading torch; training happens in a child process.
"""
