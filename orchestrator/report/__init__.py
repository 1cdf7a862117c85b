"""MLflow runs -> the paper's tables and figures.

``paper`` holds the published numbers; ``results`` reads the trial runs into per-fold and
per-group frames; ``tables`` builds Tables 1-4, per-class recall, paired comparisons and figures.
"""
