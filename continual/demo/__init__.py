"""`make demo`: the real service driven through drifting streams of real data (``python -m continual.demo``)."""
