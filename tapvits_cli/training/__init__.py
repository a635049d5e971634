"""Training: fine-tuning a (pruned) model, or training one from random initialisation.

Pure logic on modules and tensors: :func:`loop.train` takes a model, a dataset selection
and a :class:`loop.TrainConfig` and returns the trained model and its history. Files
(checkpoints, artifacts) and printing belong to the caller, reached through callbacks.
"""
