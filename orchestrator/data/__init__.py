"""Raw videos -> the preprocessing cache, and the cache -> folds.

``datasets`` (layouts and labels) and ``settings`` (what changes a cache) are leaves; ``video``
decodes frames and ``faces`` labels them with MTCNN; ``preprocess`` runs both over a dataset and
writes through ``cache`` (the on-disk format and its reader); ``folds`` splits a cache's manifest by
subject; ``demo`` writes the synthetic dataset.
"""
