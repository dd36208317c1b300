"""The running process: composition root, runtime, scheduler jobs, restart recovery, the training worker."""
