"""Stage 3 of METHOD.md: how much each MLP neuron and attention head matters, and each layer.

Pure logic on modules and tensors (no files, no printing). ``score_model`` is the entry
point; the criteria work on the family-neutral unit views of ``models/units.py``:

- ``statistics``: one forward pass over the metric set gathering, per unit layer, exact
  sufficient statistics (|x| sums, channel sums and Gram matrix, per-sample pooled outputs);
- ``composite``: activity, Gaussian-MI redundancy, HSIC task relevance, their composite;
- ``output_norm``: each unit's RMS contribution through its gate, from per-unit second moments;
- ``baselines``: ``magnitude``, ``taylor``, ``random``;
- ``probes``: the KL layer importance, replaying blocks l..L from cached block inputs.
"""
