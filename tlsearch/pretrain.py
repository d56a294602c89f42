"""Source pretraining, done once and cached on disk under a content hash.

The key hashes (source data, model, pretraining settings, seed): the same study, a resumed study or
any worker gets the same key and reuses the file. Checkpoints are written atomically (temporary
file, then ``os.replace``) under a file lock, so processes that need the same checkpoint at once
train it once while the others wait. Each checkpoint has a sidecar JSON with the SHA-256 of its
bytes; a file that does not match is never used but rebuilt. A cache that cannot be written (full
disk, read-only volume without the checkpoint) is one :class:`CheckpointError` line.

With ``pretrain.checkpoint`` the user's own state dict replaces pretraining
(:func:`user_checkpoint`): it is checked against the model (names through the model entry's key
adapter, shapes), completed with the model's own initialisation where ``pretrain.strict = false``
lets keys be missing, and cached in the model's naming like a pretrained checkpoint, so workers,
``final`` and the penalties see one kind of file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock

from tlsearch._io import atomic_write, sha256_file
from tlsearch.config import StudyConfig
from tlsearch.data import TransferTask
from tlsearch.errors import CheckpointError, ConfigError
from tlsearch.models import HEAD, create_model
from tlsearch.registry import MODELS
from tlsearch.threads import current_policy, rebalance
from tlsearch.training import evaluate, minibatches, to_tensors

__all__ = [
    "Checkpoint",
    "cache_copy",
    "cache_dir",
    "cached_checkpoint",
    "checkpoint_key",
    "ensure_pretrained",
    "load_checkpoint",
    "check_model_origin",
    "read_state_dict",
    "source_record",
    "user_checkpoint",
]

_log = logging.getLogger(__name__)

# Bump when the training recipe changes in a way the config does not show.
_FORMAT = 1


@dataclass(frozen=True)
class Checkpoint:
    """Where a pretrained source model lives and what its bytes hash to."""

    path: Path
    sha256: str
    key: str


def cache_dir(cfg: StudyConfig) -> Path:
    if cfg.pretrain.cache_dir is not None:
        return cfg.pretrain.cache_dir
    env = os.environ.get("TLSEARCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tlsearch"


def lock_dir(cfg: StudyConfig) -> Path:
    """Where this host's lock files live: ``<cache>/.locks``. They are never deleted: a lock file
    removed while held would let a second process take the same lock."""
    return cache_dir(cfg) / ".locks"


def checkpoint_key(cfg: StudyConfig, task: TransferTask, user_sha256: str | None = None) -> str:
    """The cache key: what the checkpoint's bytes depend on.

    Pretrained: the source data, the model and the pretraining settings (not ``checkpoint`` and
    ``strict``, which are unset then). From the user's file (``user_sha256``): its bytes, the
    model, ``strict`` and the seed that initialises what the file does not hold.
    """
    if cfg.pretrain.checkpoint is not None:
        assert user_sha256 is not None, "the user's checkpoint is hashed by the caller"
        payload: dict = {
            "format": _FORMAT,
            "user_checkpoint": user_sha256,
            "input_shape": list(task.input_shape),
            "model": cfg.model.model_dump(mode="json"),
            "strict": cfg.pretrain.strict,
            "seed": cfg.pretrain.seed,
        }
        return "user-" + _sha(payload)[:19]
    assert task.source is not None, "a study without a source set needs pretrain.checkpoint"
    pre = cfg.pretrain.model_dump(mode="json", exclude={"cache_dir", "checkpoint", "strict"})
    payload = {
        "format": _FORMAT,
        "source": task.source.fingerprint(),
        "input_shape": list(task.input_shape),
        "model": cfg.model.model_dump(mode="json"),
        "pretrain": pre,
    }
    return _sha(payload)[:24]


def _sha(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_checkpoint(
    ckpt: Checkpoint, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The state dict, after checking the file's hash; ``weights_only=True`` loads no code."""
    if not ckpt.path.is_file():
        raise CheckpointError(f"pretrained checkpoint not found: {ckpt.path}")
    actual = sha256_file(ckpt.path)
    if actual != ckpt.sha256:
        raise CheckpointError(
            f"pretrained checkpoint {ckpt.path} has SHA-256 {actual[:12]}…, "
            f"expected {ckpt.sha256[:12]}…"
        )
    try:
        return torch.load(ckpt.path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch refuses is one line for the user
        # weights_only=True unpickles tensors and plain containers only: code or custom classes
        # in the file are refused here, never run.
        raise CheckpointError(
            f"pretrained checkpoint {ckpt.path} is not a plain state dict "
            f"({type(e).__name__}); delete it and its .json to pretrain again"
        ) from None


def _train_source(cfg: StudyConfig, task: TransferTask, device: torch.device) -> tuple[dict, dict]:
    """Pretrain with the process's thread policy (:mod:`tlsearch.device`), if it has one.

    A checkpoint's bytes depend on the thread count (with 1 thread one gradient's matrix product
    sums in another order; 2, 3, 4 and 8 threads gave identical bytes) and on the CPU kind's
    matrix kernels, so no host is asked to reproduce them: the study keeps a copy of the
    checkpoint in its storage, which workers on other hosts fetch
    (:func:`tlsearch.storage.store_checkpoint`).
    """
    policy = current_policy()
    if policy is not None:
        policy.apply()
    return _train(cfg, task, device)


def _train(cfg: StudyConfig, task: TransferTask, device: torch.device) -> tuple[dict, dict]:
    pre = cfg.pretrain
    torch.manual_seed(pre.seed)
    generator = torch.Generator().manual_seed(pre.seed)
    model = create_model(cfg.model, task.input_shape, task.source_classes).to(device)
    x, y = to_tensors(task.source.x, task.source.y, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=pre.lr, weight_decay=pre.weight_decay)
    t0 = time.perf_counter()
    model.train()
    for _ in range(pre.epochs):
        rebalance()  # another job may have started: re-check the threads (at most every second)
        for idx in minibatches(len(y), pre.batch_size, generator):
            xb, yb = (x, y) if idx is None else (x[idx.to(device)], y[idx.to(device)])
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    acc, loss_value = evaluate(model, x, y)
    info = {
        "source_train_accuracy": acc,
        "source_train_loss": loss_value,
        "seconds": round(time.perf_counter() - t0, 2),
        "source_samples": len(y),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return state, info


def cached_checkpoint(cfg: StudyConfig, key: str) -> Checkpoint | None:
    """The checkpoint of content key ``key`` in this host's cache, if its bytes are intact."""
    return _cached(cache_dir(cfg) / f"source-{key}.pt", key)


def _cached(path: Path, key: str) -> Checkpoint | None:
    """The checkpoint at ``path`` if it and its sidecar exist and its bytes hash as recorded."""
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    try:
        sha = json.loads(meta_path.read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Checkpoint(path, sha, key) if sha == sha256_file(path) else None


def _save(state: dict, info: dict, path: Path, key: str) -> Checkpoint:
    """Write the checkpoint, then its sidecar, each atomically; a failed write leaves no temp."""
    # Serialized in memory first: a failed file write is then an OSError that names its reason
    # (torch.save straight to a full disk reports an internal position mismatch instead).
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return _write(buffer.getvalue(), info, path, key)


def _write(data: bytes, info: dict, path: Path, key: str) -> Checkpoint:
    sha = hashlib.sha256(data).hexdigest()
    where = "pretrain.cache_dir: "
    atomic_write(path, lambda p: p.write_bytes(data), CheckpointError, where)
    sidecar = json.dumps({"sha256": sha, "key": key, **info}, indent=2)
    atomic_write(
        path.with_suffix(".json"), lambda p: p.write_text(sidecar), CheckpointError, where
    )
    return Checkpoint(path, sha, key)


def cache_copy(cfg: StudyConfig, key: str, data: bytes, origin: str) -> Checkpoint:
    """``data``, a study's checkpoint from elsewhere (its database), written into this host's
    cache under the study's key, so that this host reads it from disk next time."""
    root = cache_dir(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"pretrain.cache_dir: cannot create {root}: {e.strerror}") from None
    return _write(data, {"copied_from": origin}, root / f"source-{key}.pt", key)


# How many names a checkpoint error lists of each kind: enough to see the pattern (a prefix such
# as "module." or "backbone."), short enough for one line.
_SHOW = 4


def read_state_dict(path: Path, field: str = "pretrain.checkpoint") -> dict[str, torch.Tensor]:
    """A user's state dict, loaded with ``weights_only=True`` (tensors and plain containers only:
    a pickled object is refused, never run). Anything else is one :class:`ConfigError` line."""
    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch refuses is one line for the user
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds pickled objects, which weights_only=True refuses to run"
        else:
            # torch's own message for a file it did not write is an internal detail ("101").
            reason = f"torch.load cannot read it: {type(e).__name__}"
        raise ConfigError(
            f"{field}: {path} is not a plain PyTorch state dict ({reason})"
        ) from None
    if not isinstance(state, dict) or not state:
        raise ConfigError(
            f"{field}: {path} holds a {type(state).__name__}, not a state dict "
            "(a mapping of parameter names to tensors, as model.state_dict() gives)"
        )
    bad = [str(k) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        nested = [k for k in bad if isinstance(state.get(k), dict)]
        hint = (
            f"; if the state dict is under '{nested[0]}', save that entry alone" if nested else ""
        )
        raise ConfigError(
            f"{field}: {path} is not a state dict: {len(bad)} of its entries are not "
            f"name → tensor ({', '.join(bad[:_SHOW])}){hint}"
        )
    return state


def _fit_to_model(
    state: dict[str, torch.Tensor], cfg: StudyConfig, task: TransferTask, field: str
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """The model's full state: the file's tensors where name and shape match, the model's own
    initialisation (seeded by ``pretrain.seed``) elsewhere; and what was not loaded.

    The file's head (after the key adapter, ``head.*``) is dropped: the target has its own
    classes. Strict, any missing, unexpected or mis-shaped key is one ConfigError listing the
    first few of each.
    """
    torch.manual_seed(cfg.pretrain.seed)
    model = create_model(cfg.model, task.input_shape, task.target_classes)
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    given = MODELS.get(cfg.model.name).adapt_keys(dict(state))
    given = {k: v for k, v in given.items() if not k.startswith(HEAD)}
    wanted = [k for k in own if not k.startswith(HEAD)]
    missing = [k for k in wanted if k not in given]
    unexpected = [k for k in given if k not in own]
    shapes = [
        f"{k} {list(given[k].shape)} ≠ {list(own[k].shape)}"
        for k in wanted
        if k in given and given[k].shape != own[k].shape
    ]
    skipped = {"missing": missing, "unexpected": unexpected, "shape": shapes}
    if len(missing) + len(shapes) == len(wanted):
        raise ConfigError(
            f"{field}: no parameter of model '{cfg.model.name}' matches the file in name and "
            f"shape{_listing(skipped)}"
        )
    if cfg.pretrain.strict and (missing or unexpected or shapes):
        raise ConfigError(
            f"{field}: the file does not fit model '{cfg.model.name}'{_listing(skipped)}; "
            "fix the model options or the key names, or set pretrain.strict = false to load "
            "what matches"
        )
    out = dict(own)
    for k in wanted:
        if k in given and given[k].shape == own[k].shape:
            out[k] = given[k].detach().to(own[k].dtype).contiguous()
    return out, skipped


_LABELS = {"missing": "missing", "unexpected": "unexpected", "shape": "shape mismatch"}


def _listing(skipped: dict[str, list[str]]) -> str:
    parts = []
    for kind, names in skipped.items():
        if names:
            more = f", … {len(names) - _SHOW} more" if len(names) > _SHOW else ""
            parts.append(f"{len(names)} {_LABELS[kind]} ({', '.join(names[:_SHOW])}{more})")
    return ": " + "; ".join(parts) if parts else ""


def user_checkpoint(
    cfg: StudyConfig,
    task: TransferTask,
    path: Path | None = None,
    expected: Mapping[str, Any] | None = None,
) -> tuple[Checkpoint, str]:
    """The user's checkpoint (``pretrain.checkpoint``, or ``path`` on another host) fitted to the
    model and cached; returns it and the SHA-256 of the user's file.

    ``pretrain.strict = false`` loads the tensors that match in name and shape and logs the
    rest; the parameters not loaded keep the model's initialisation (seeded by
    ``pretrain.seed``), which is then also the starting point L2-SP and DELTA pull them toward.
    ``expected``: the study's record of the file (``path``, ``sha256``); a file with other bytes
    is refused before it is read. Once fitted and cached, the file is hashed but not loaded again.
    """
    field = "pretrain.checkpoint" if path is None else "--checkpoint"
    src = path or cfg.pretrain.checkpoint
    assert src is not None
    if not src.is_file():
        raise ConfigError(f"{field}: file not found: {src}")
    user_sha = sha256_file(src)
    if expected and expected.get("sha256") and user_sha != expected["sha256"]:
        raise ConfigError(
            f"{field}: {src} has SHA-256 {user_sha[:12]}…, the study was created from "
            f"{expected['sha256'][:12]}… ({expected.get('path')})"
        )
    key = checkpoint_key(cfg, task, user_sha)
    root = cache_dir(cfg)
    target = root / f"source-{key}.pt"
    cached = _cached(target, key)
    if cached is not None:
        return cached, user_sha
    state = read_state_dict(src, field)
    fitted, skipped = _fit_to_model(state, cfg, task, field)
    for kind, names in skipped.items():
        if names:
            _log.warning(
                "%s: not loaded (pretrain.strict = false), %d %s: %s%s; they start from the "
                "model's own initialisation, which the penalties also pull them toward",
                src,
                len(names),
                _LABELS[kind],
                ", ".join(names[:_SHOW]),
                ", …" if len(names) > _SHOW else "",
            )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"pretrain.cache_dir: cannot create {root}: {e.strerror}") from None
    info = {"user_checkpoint": str(src), "user_sha256": user_sha, "skipped": skipped}
    ckpt = _save(fitted, info, target, key)
    _log.info("source checkpoint from %s (SHA-256 %s…): %s", src, user_sha[:12], target)
    return ckpt, user_sha


def ensure_pretrained(
    cfg: StudyConfig, task: TransferTask, device: torch.device | str = "cpu"
) -> Checkpoint:
    """Return the cached checkpoint for this study, training it first if no valid one exists.

    With ``pretrain.checkpoint`` nothing is trained: the user's file is fitted to the model
    (:func:`user_checkpoint`). A valid checkpoint is used without taking the cache's lock, so a
    read-only cache (a shared volume) serves as well as a writable one.
    """
    if cfg.pretrain.checkpoint is not None:
        return user_checkpoint(cfg, task)[0]
    device = torch.device(device)
    root = cache_dir(cfg)
    key = checkpoint_key(cfg, task)
    path = root / f"source-{key}.pt"
    cached = _cached(path, key)
    if cached is not None:
        _log.info("pretrained checkpoint (cached): %s", path)
        return cached
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"pretrain.cache_dir: cannot create {root}: {e.strerror}") from None
    # Under <cache>/.locks, never deleted (a lock file removed while held lets a second process
    # take the same lock).
    locks = lock_dir(cfg)
    try:
        locks.mkdir(exist_ok=True)
    except OSError as e:
        raise CheckpointError(
            f"pretrain.cache_dir: cannot write in {root}: {e.strerror}"
        ) from None
    lock = FileLock(str(locks / f"{path.name}.lock"))
    try:
        lock.acquire()
    except OSError as e:
        raise CheckpointError(
            f"pretrain.cache_dir: cannot write in {root}: {e.strerror}"
        ) from None
    try:
        # Another process may have trained it while this one waited for the lock.
        cached = _cached(path, key)
        if cached is not None:
            _log.info("pretrained checkpoint (cached): %s", path)
            return cached
        if path.exists():
            _log.warning("pretrained checkpoint %s does not match its hash; retraining it", path)
        _log.info("pretraining the source model on %d samples ...", len(task.source))
        state, info = _train_source(cfg, task, device)
        ckpt = _save(state, info, path, key)
    finally:
        lock.release()
    _log.info(
        "pretrained checkpoint: %s (source train accuracy %.3f, %.1fs)",
        path,
        info["source_train_accuracy"],
        info["seconds"],
    )
    return ckpt


def source_record(cfg: StudyConfig, task: TransferTask, user_sha256: str | None) -> dict:
    """Where a study's source model came from, recorded with it (``ATTR_SOURCE``): the model's
    registry origin ("tlsearch", a plug-in's distribution and version, or its file), the user's
    checkpoint (path, SHA-256, strict) if any, and the normalization of images from folders."""
    user = None
    if cfg.pretrain.checkpoint is not None:
        user = {
            "path": str(cfg.pretrain.checkpoint),
            "sha256": user_sha256,
            "strict": cfg.pretrain.strict,
        }
    return {
        "model": cfg.model.name,
        "model_origin": MODELS.get(cfg.model.name).origin,
        "checkpoint": user,
        "normalization": getattr(task, "normalization", None),
    }


def check_model_origin(cfg: StudyConfig, recorded: dict) -> None:
    """A worker's model must come from where the study's came from: the same plug-in
    distribution and version (a plug-in loaded from a file has no version: any file passes)."""
    want = recorded.get("model_origin")
    have = MODELS.get(cfg.model.name).origin
    if want is None or want == have:
        return
    if want.startswith("plug-in ") and have.startswith("plug-in "):
        return
    raise ConfigError(
        f"model.name: the study's model '{cfg.model.name}' came from {want}; this worker has it "
        f"from {have} (install the study's version on this host)"
    )
