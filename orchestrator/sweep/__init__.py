"""Ray Tune + Optuna sweeps over dataset x architecture x fold.

``space`` (the search-space file, validated against the trial config) -> ``searcher`` (per-group
Optuna over CV folds) and ``cell`` (Tune config -> trial) -> ``stages`` (the two Tune experiments)
-> ``run`` (:func:`run_sweep`: state, resume, Ray, MLflow parent runs). ``state``, ``cluster``,
``parents``, ``caches``, ``progress``, ``result`` and ``errors`` each hold one of its concerns.
"""
