"""The project's vocabulary: every dataset, architecture, stage, precision and preset name, once.

Everything else imports its names from here (the model, the trial config schema, the search-space
validation, the CLI, the tables), so a name can only be spelled in one place. This module imports
nothing but the standard library: the CLI's ``--help`` and search-space validation read it
without loading torch, Ray or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

# ------------------------------------------------------------------------------------ datasets

RAVDESS = "ravdess"
CREMA_D = "crema-d"
MEAD = "mead"
DEMO = "demo"  # the synthetic dataset of ``mtcae demo-data`` (RAVDESS layout)

DATASETS: tuple[str, ...] = (RAVDESS, CREMA_D, MEAD, DEMO)
PAPER_DATASETS: tuple[str, ...] = (RAVDESS, CREMA_D, MEAD)  # the paper's order (Tables 1-4)
DATASET_LABELS: dict[str, str] = {RAVDESS: "RAVDESS", CREMA_D: "CREMA-D", MEAD: "MEAD", DEMO: "demo"}


# ------------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class ArchitectureName:
    """One of Table 1's six structure strategies, as the paper labels it.

    Attributes:
        name: Registry name (``--arch``, the ``arch`` tag, ``model.build_model``).
        mtl_type: Table 1's "MTL Type" column.
        decoder_kind: ``vit`` (cross-attention decoders, Algorithm 1), ``mlp`` or None (no decoder).
    """

    name: str
    mtl_type: str
    decoder_kind: str | None

    @property
    def decoder_label(self) -> str:
        """Table 1's "Decoder" column."""
        return {"vit": "ViT Decoder", "mlp": "MLP", None: "-"}.get(self.decoder_kind, str(self.decoder_kind))

    @property
    def display(self) -> str:
        """The name a figure or a paper uses: "Cascaded ViT Decoder", "STL"."""
        return self.mtl_type if self.decoder_kind is None else f"{self.mtl_type} {self.decoder_label}"

    @property
    def multitask(self) -> bool:
        """Whether the architecture trains the box and landmark tasks too."""
        return self.decoder_kind is not None


# Table 1's rows in the paper's order; ``cascaded_vit`` is MTCAE-DFER itself.
ARCHITECTURE_NAMES: tuple[ArchitectureName, ...] = (
    ArchitectureName("stl", "STL", None),
    ArchitectureName("nonshared_mlp", "Non-Fully Shared", "mlp"),
    ArchitectureName("nonshared_vit", "Non-Fully Shared", "vit"),
    ArchitectureName("shared_mlp", "Fully Shared", "mlp"),
    ArchitectureName("shared_vit", "Fully Shared", "vit"),
    ArchitectureName("cascaded_vit", "Cascaded", "vit"),
)
ARCHITECTURES: tuple[str, ...] = tuple(a.name for a in ARCHITECTURE_NAMES)
ARCHITECTURE_BY_NAME: dict[str, ArchitectureName] = {a.name: a for a in ARCHITECTURE_NAMES}
STL, NONSHARED_MLP, NONSHARED_VIT, SHARED_MLP, SHARED_VIT, CASCADED_VIT = ARCHITECTURES
VIT_DECODER_ARCHS: tuple[str, ...] = tuple(a.name for a in ARCHITECTURE_NAMES if a.decoder_kind == "vit")
MULTITASK_ARCHS: tuple[str, ...] = tuple(a.name for a in ARCHITECTURE_NAMES if a.multitask)

TASKS: tuple[str, ...] = ("box", "landmark", "expr")  # the cascade's order (Algorithm 1)


# ------------------------------------------------------------------------------------- stages

STAGE_SEARCH = "search"  # the hyperparameter search; with nested selection it also gives the results
STAGE_CV = "cv"  # the cross-validation of a fixed configuration, or of a pooled choice
STAGES: tuple[str, ...] = (STAGE_SEARCH, STAGE_CV)  # a trial's stage, in the order a sweep runs them
# Stages of the MLflow parent runs a sweep creates (they hold no trial).
STAGE_SWEEP = "sweep"
STAGE_GROUP = "group"


# ---------------------------------------------------------------------------------- selection

# What an epoch's weights, a configuration and a table row are chosen on: one validation metric,
# with its direction. ``val_accuracy`` is the released code's ModelCheckpoint/EarlyStopping monitor.
SELECTION_METRICS: dict[str, str] = {
    "val_accuracy": "max", "val_uar": "max", "val_war": "max", "val_loss": "min", "val_loss_expr": "min",
}
DEFAULT_SELECTION_METRIC = "val_accuracy"

# How a searched configuration is chosen for an outer fold. ``nested``: a study per (dataset, arch,
# outer fold) searches on that fold's training subjects only (its validation slice is carved from
# them) and the trial it chooses is the fold's result. ``pooled``: one study per group, scored on
# the validation slices of several folds, then tested on every fold (optimistic: those validation
# subjects are other folds' test subjects).
SELECTION_NESTED = "nested"
SELECTION_POOLED = "pooled"
SELECTIONS: tuple[str, ...] = (SELECTION_NESTED, SELECTION_POOLED)


# ----------------------------------------------------------------------- presets and switches

VIDEOMAE_PRESETS: tuple[str, ...] = ("tiny", "vit_small", "vit_base", "vit_large")  # the paper's family
LGI_FORMER_PRESETS: tuple[str, ...] = ("lgi_former_tiny", "lgi_former_base")  # MAE-DFER's encoder
ENCODER_PRESETS: tuple[str, ...] = VIDEOMAE_PRESETS + LGI_FORMER_PRESETS
SMALL_ENCODER_PRESETS: tuple[str, ...] = ("tiny", "vit_small", "lgi_former_tiny")  # sized for a CPU
DECODER_PRESETS: tuple[str, ...] = ("paper", "official")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
FEATURE_CACHE_MODES: tuple[str, ...] = ("auto", "on", "off")
NORMALIZATIONS: tuple[str, ...] = ("imagenet", "official")
HEAD_ORDERS: tuple[str, ...] = ("norm_pool", "pool_norm")
