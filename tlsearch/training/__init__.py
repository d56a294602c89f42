"""Fine-tuning: one fold top to bottom (:mod:`~tlsearch.training.fold`), the folds of a trial
trained together (:mod:`~tlsearch.training.together`) or side by side on threads
(:mod:`~tlsearch.training.lanes`), and the optimizer step they share."""

from tlsearch.training.fold import (
    Recipe,
    Run,
    batchnorm_from,
    block_outputs,
    channels_last,
    evaluate,
    finetune,
    fold_run,
    minibatches,
    predictions,
    to_tensors,
)
from tlsearch.training.lanes import Lanes
from tlsearch.training.together import finetune_folds, fold_batchable, folds_run

__all__ = [
    "Lanes",
    "Recipe",
    "Run",
    "batchnorm_from",
    "block_outputs",
    "channels_last",
    "evaluate",
    "finetune",
    "finetune_folds",
    "fold_batchable",
    "fold_run",
    "folds_run",
    "minibatches",
    "predictions",
    "to_tensors",
]
