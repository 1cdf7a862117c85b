"""One trial: one architecture on one fold of one dataset with one configuration.

``config`` (the schema) -> ``data`` (the fold's clips and batch sources) -> ``loop`` (train,
validate, test) with ``device``, ``checkpoint`` and ``run_logger`` (MLflow) -> ``entrypoints``
(Ray Tune's function trainable and ``mtcae train``).
"""
