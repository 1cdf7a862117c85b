"""Orchestration for MTCAE-DFER: datasets, preprocessing, folds, trials, sweeps, tracking, tables.

Data flows one way: videos -> preprocess cache -> trainable -> sweep -> MLflow -> tables.
See ``docs/design.md`` for the contracts between the stages.
"""
