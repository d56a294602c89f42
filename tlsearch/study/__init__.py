"""The study driver: setup (:mod:`~tlsearch.study.setup`), the trial loop
(:mod:`~tlsearch.study.loop`), clean stops (:mod:`~tlsearch.study.stop`) and progress output
(:mod:`~tlsearch.study.progress`)."""

from tlsearch.study.loop import STORAGE_PATIENCE, run_study, run_trials
from tlsearch.study.progress import ProgressPrinter, summary_table
from tlsearch.study.setup import (
    StudyContext,
    make_objective,
    prepare,
    setup_study,
    thread_policy,
    threads_per_trial,
    worker_attrs,
)
from tlsearch.study.stop import Interrupted, StopFlag, graceful_stop, stopped

__all__ = [
    "STORAGE_PATIENCE",
    "Interrupted",
    "ProgressPrinter",
    "StopFlag",
    "StudyContext",
    "graceful_stop",
    "make_objective",
    "prepare",
    "run_study",
    "run_trials",
    "setup_study",
    "stopped",
    "summary_table",
    "thread_policy",
    "threads_per_trial",
    "worker_attrs",
]
