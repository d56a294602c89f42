"""Watch a study in optuna-dashboard: the study's note, and a local server for the dashboard.

The note is markdown stored with the study through optuna-dashboard's note API; it tells whoever
opens the dashboard what a trial measures (data, model, regularizer, search space, CV scheme). The
server is optuna-dashboard's own WSGI app, bound to 127.0.0.1 unless a host is given on purpose:
the dashboard has no login, and anyone who reaches it can read the study and edit its notes.
"""

from __future__ import annotations

import ipaddress
import logging
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna

from tlsearch.config import ParamRange, StudyConfig
from tlsearch.errors import StorageError, TlsearchError
from tlsearch.samplers import reports_fold_scores
from tlsearch.storage import create_storage, mask_url, sqlite_file_missing

__all__ = ["DashboardServer", "describe_study", "study_note", "write_study_note"]

_log = logging.getLogger(__name__)


def _fmt_range(value: ParamRange | float, integer: bool = False) -> str:
    if not isinstance(value, ParamRange):
        return f"{int(value)} (fixed)" if integer else f"{value:g} (fixed)"
    if integer:
        return f"{int(value.low)} … {int(value.high)}"
    scale = ", log scale" if value.log else (f", step {value.step:g}" if value.step else "")
    return f"{value.low:g} … {value.high:g}{scale}"


_COVERED = {"weights": "the weight kernels", "all": "all trainable parameters"}


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def describe_study(cfg: StudyConfig, task_description: str | None = None) -> dict[str, str]:
    """What a trial of the study measures, as (topic → one line) in reading order.

    The dashboard note and the HTML report both show it.
    """
    return {
        "Data": _data_line(cfg, task_description),
        "Model": _model_line(cfg),
        "Regularizer": _regularizer_line(cfg),
        "Search space": _space_line(cfg),
        "CV scheme": _cv_line(cfg),
        "Search": _search_line(cfg),
    }


def _data_line(cfg: StudyConfig, task_description: str | None) -> str:
    """The task (its description, shots and data seed), or the user's source and target."""
    d = cfg.data
    if d.task is None:
        return task_description or f"{d.source or 'your checkpoint'} → {d.target}"
    data = f"task `{d.task}`"
    if task_description:
        data += f" ({task_description})"
    shots = 5 if d.shots is None else d.shots
    return data + f"; {shots or 'all'} labelled target images per class, data seed {d.seed}"


def _model_line(cfg: StudyConfig) -> str:
    """The network, then how it is pretrained and fine-tuned."""
    m = cfg.model
    if m.name == "cnn":
        model = f"CNN, conv channels {m.channels}, fc {m.fc}"
    elif m.name == "mlp":
        model = f"MLP, hidden sizes {m.hidden}"
    else:
        model = m.name
    return model + (
        f"; pretrained on the source for {_epochs(cfg.pretrain.epochs)} (lr {cfg.pretrain.lr:g}), "
        f"then fine-tuned for {_epochs(cfg.finetune.epochs)} with {cfg.finetune.optimizer}"
    )


def _regularizer_line(cfg: StudyConfig) -> str:
    r = cfg.regularizer
    reg = " or ".join(f"`{n}`" for n in r.names) + (" (searched)" if len(r.names) > 1 else "")
    return reg + (
        f": λ/2 · Σ‖p − p⁰‖² over {_COVERED[r.penalize]}, added to the mean cross-entropy "
        f"(scale `{r.scale}`, head β {r.head_lambda:g})"
    )


def _space_line(cfg: StudyConfig) -> str:
    s = cfg.search
    parts = [
        f"λ {_fmt_range(s.lambda_)}",
        f"lr {_fmt_range(s.lr)}",
        f"frozen_blocks {_fmt_range(s.frozen_blocks, integer=True)}",
        f"backbone_lr_mult {_fmt_range(s.backbone_lr_mult)}",
    ]
    # Only where the study may augment: a study made before keeps its note as it was.
    if s.augment != "none":
        choices = "auto (on images)" if s.augment == "auto" else ", ".join(s.augment)
        parts.append(f"augment {choices}")
    return "; ".join(parts)


def _cv_line(cfg: StudyConfig) -> str:
    """The folds, what a trial's value is, and what its intermediate values are."""
    value = {
        "accuracy": "the mean fold accuracy",
        "loss": "minus the mean fold cross-entropy",
        "accuracy_then_loss": "the mean fold accuracy, ties broken by the mean fold loss",
    }[cfg.cv.metric]
    repeats = f", {cfg.cv.repeats} repeats" if cfg.cv.repeats > 1 else ""
    if cfg.pruner.by_epoch:
        steps = (
            "its intermediate value at step e is that of every fold after e epochs (the folds "
            "train side by side; a report every 5 epochs)"
        )
    else:
        steps = "its intermediate value at step i is that of " + (
            "fold i alone" if reports_fold_scores(cfg) else "folds 0 … i"
        )
    return (
        f"{cfg.cv.k}-fold {'stratified ' if cfg.cv.stratified else ''}cross-validation on the "
        f"target training split (seed {cfg.cv.seed}{repeats}); a trial's value "
        f"(`{cfg.cv.metric_name}`) is {value}; {steps}"
    )


def _search_line(cfg: StudyConfig) -> str:
    """Sampler, pruner, budget, the confirmation round and the export's rule."""
    search = f"sampler `{cfg.sampler.name}`, pruner `{cfg.pruner.name}`, " + (
        f"{cfg.n_trials} trials" if cfg.n_trials is not None else f"until {cfg.timeout:g}s"
    )
    if cfg.select.confirm:
        search += (
            f", then a confirmation round (the top {cfg.select.confirm} configurations and plain "
            "fine-tuning again on fresh folds)"
        )
    return search + f"; the export's rule: `{cfg.select.rule}`"


def study_note(cfg: StudyConfig, task_description: str | None = None) -> str:
    """The study's dashboard note (markdown)."""
    lines = [f"## tlsearch study `{cfg.name}`", ""]
    lines += [f"- **{k}**: {v}" for k, v in describe_study(cfg, task_description).items()]
    lines += [
        "",
        "User attributes of each trial: `fold_scores`, `fold_losses`, `fold_seconds`, `cv_mean`, "
        "`cv_std`, `seconds`. The target test split is never used by the search: "
        "`tlsearch export` then `tlsearch final` measure it once.",
        "",
    ]
    return "\n".join(lines)


def write_study_note(study: optuna.Study, cfg: StudyConfig, task_description: str | None) -> bool:
    """Store :func:`study_note` as the study's note; return whether it changed.

    An unchanged note is not written again, so resuming a study does not pile up note versions.
    """
    # Imported here, not with the module: 1.2 s that a worker, which writes no note, never pays.
    import optuna_dashboard

    body = study_note(cfg, task_description)
    if optuna_dashboard.get_note(study) == body:
        return False
    optuna_dashboard.save_note(study, body)
    return True


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # The dashboard's page fetches several API routes at once; one thread each.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - wsgiref's signature
        _log.debug("dashboard: " + format, *args)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DashboardServer:
    """optuna-dashboard for one storage, bound to ``host:port`` (port 0 picks a free one)."""

    def __init__(self, storage_url: str, host: str = "127.0.0.1", port: int = 8080) -> None:
        # A mistyped SQLite path is reported, not created as an empty database to look at.
        if sqlite_file_missing(storage_url):
            raise StorageError(
                f"{mask_url(storage_url)}: no such SQLite file, so no study to show"
            )
        self.storage = create_storage(storage_url)
        self.storage_label = mask_url(storage_url)
        import optuna_dashboard  # as in write_study_note: only what serves or notes pays for it

        app = optuna_dashboard.wsgi(self.storage)
        try:
            self.httpd = make_server(
                host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler
            )
        except OSError as e:
            raise TlsearchError(
                f"dashboard: cannot listen on {host}:{port}: {e.strerror}"
            ) from None
        self.host = host
        self.port = self.httpd.server_address[1]
        if not _is_loopback(host):
            _log.warning(
                "dashboard: listening on %s, not only this machine: it has no login, and anyone "
                "who reaches it can read the studies and edit their notes",
                host,
            )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def study_urls(self) -> dict[str, str]:
        """Each study's page in the dashboard, by study name."""
        return {
            s.study_name: f"{self.url}dashboard/studies/"
            f"{self.storage.get_study_id_from_name(s.study_name)}"
            for s in self.storage.get_all_studies()
        }

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()
