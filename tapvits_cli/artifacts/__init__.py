"""The artifact protocol in code: the only package that reads or writes files.

Import the submodule you need (``artifacts.model``, ``artifacts.kinds``); this
package's import stays free of torch so the CLI starts fast.

Readers have one convention: a reader returns one object with named fields, never a
tuple, and that object carries ``.artifact`` (the opened file: header, lineage, metadata)
wherever a caller needs it: ``read_gmm`` → ``Gmm``, ``read_metric_set`` → ``MetricSet``,
``read_scores`` → ``Scores``, ``read_plan`` → ``Plan``, ``open_feature_table`` →
``FeatureTable``, ``read_model_spec`` and ``verify_model`` → ``ModelFile``, ``load_model`` →
``LoadedModel``. ``read_profile`` gives the ``payloads.latency_table.LatencyProfile`` and
``read_report`` the checked body, whose callers need no header.
"""
