"""Ray Tune + Optuna sweeps over dataset x architecture x fold.

``space_file`` reads a search-space file, validated against the trial config, into a ``space``;
``searcher`` (per-group Optuna over CV folds) and ``cell`` (Tune config -> trial) feed ``stages``
(the two Tune experiments); ``run`` (:func:`run_sweep`) ties them to the sweep's ``state``, Ray
(``cluster``), MLflow parent runs (``parents``), the preprocessing ``caches``, ``progress`` and the
``result``; ``errors`` holds the exceptions.
"""
