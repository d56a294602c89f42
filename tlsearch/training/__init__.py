"""Fine-tuning: one fold top to bottom (:mod:`~tlsearch.training.trainer`), how a trial's folds
train (:mod:`~tlsearch.training.schedule`: in turn, stacked, side by side on threads with
:mod:`~tlsearch.training.lanes`), their evaluation (:mod:`~tlsearch.training.evaluate`), a run's
own random stream (:mod:`~tlsearch.training.rng`) and the fused Adam step
(:mod:`~tlsearch.training.adam`)."""

from tlsearch.training.evaluate import Held, batchnorm_from, evaluate, predictions
from tlsearch.training.lanes import Lanes
from tlsearch.training.schedule import (
    CURVE_EVERY,
    Schedule,
    TrialFolds,
    Watch,
    finetune,
    finetune_folds,
    train_to_end,
)
from tlsearch.training.trainer import (
    FoldJob,
    FrozenFeatures,
    Recipe,
    Trainer,
    block_outputs,
    channels_last,
    minibatches,
    start_model,
    to_tensors,
)

__all__ = [
    "CURVE_EVERY",
    "FoldJob",
    "FrozenFeatures",
    "Held",
    "Lanes",
    "Recipe",
    "Schedule",
    "Trainer",
    "TrialFolds",
    "Watch",
    "batchnorm_from",
    "block_outputs",
    "channels_last",
    "evaluate",
    "finetune",
    "finetune_folds",
    "minibatches",
    "predictions",
    "start_model",
    "to_tensors",
    "train_to_end",
]
