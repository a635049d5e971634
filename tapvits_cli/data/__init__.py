"""Datasets: built-ins, ``.npz``, HDF5 and image folders behind one interface.

``open_dataset("fashion-mnist:split=test:classes=0-4")`` gives a :class:`Dataset`; the
reference grammar is normative in ``protocol/datasets.md``. This package is the only code
that reads dataset files. It imports no torch: model input preprocessing, which needs
torch, lives in :mod:`tapvits_cli.data.preprocess`.
"""

from tapvits_cli.data.dataset import Dataset, open_dataset
from tapvits_cli.data.reference import DatasetRef

__all__ = ["Dataset", "DatasetRef", "open_dataset"]
