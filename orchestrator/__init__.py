"""Orchestration for MTCAE-DFER, one package per stage of the data flow.

videos -> ``data`` (preprocessing, cache, folds) -> ``features`` (frozen-encoder tokens) ->
``trial`` (one fold of one configuration) -> ``sweep`` (Ray Tune + Optuna) -> MLflow
(``tracking``) -> ``report`` (tables, figures); ``pipeline`` chains a sweep and its tables and
``cli`` is the ``mtcae`` command. A module imports only earlier stages (``tests/test_layout.py``);
``docs/design.md`` holds the contracts between them.
"""
