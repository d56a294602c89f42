"""Source pretraining, done once and cached on disk under a content hash.

The key hashes (source data, model, pretraining settings, seed): the same study, a resumed study or
any worker gets the same key and reuses the file. Checkpoints are written atomically (temporary
file, then ``os.replace``) under a file lock, so processes that need the same checkpoint at once
train it once while the others wait. Each checkpoint has a sidecar JSON with the SHA-256 of its
bytes; a file that does not match is never used but rebuilt. A cache that cannot be written (full
disk, read-only volume without the checkpoint) is one :class:`CheckpointError` line.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock

from tlsearch._io import atomic_write, sha256_file
from tlsearch.config import StudyConfig
from tlsearch.data import TransferTask
from tlsearch.errors import CheckpointError
from tlsearch.models import create_model
from tlsearch.training import evaluate, minibatches, to_tensors

__all__ = ["Checkpoint", "cache_dir", "checkpoint_key", "ensure_pretrained", "load_checkpoint"]

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


def checkpoint_key(cfg: StudyConfig, task: TransferTask) -> str:
    # Only what shapes the training (checkpoint and strict mean no pretraining at all).
    pre = cfg.pretrain.model_dump(mode="json", exclude={"cache_dir", "checkpoint", "strict"})
    payload = {
        "format": _FORMAT,
        "source": task.source.fingerprint(),
        "input_shape": list(task.input_shape),
        "model": cfg.model.model_dump(mode="json"),
        "pretrain": pre,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


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


# Torch CPU threads while pretraining, whatever the process uses otherwise. A checkpoint's bytes
# depend on the thread count (with 1 thread one gradient's matrix product sums in another order;
# 2, 3, 4 and 8 threads gave identical bytes), and workers on other hosts check that they pretrain
# the bytes the study recorded.
PRETRAIN_THREADS = 2


def _train_source(cfg: StudyConfig, task: TransferTask, device: torch.device) -> tuple[dict, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(PRETRAIN_THREADS)
    try:
        return _train(cfg, task, device)
    finally:
        torch.set_num_threads(threads)


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
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    where = "pretrain.cache_dir: "
    atomic_write(path, lambda p: p.write_bytes(data), CheckpointError, where)
    sidecar = json.dumps({"sha256": sha, "key": key, **info}, indent=2)
    atomic_write(
        path.with_suffix(".json"), lambda p: p.write_text(sidecar), CheckpointError, where
    )
    return Checkpoint(path, sha, key)


def ensure_pretrained(
    cfg: StudyConfig, task: TransferTask, device: torch.device | str = "cpu"
) -> Checkpoint:
    """Return the cached checkpoint for this study, training it first if no valid one exists.

    A valid checkpoint is used without taking the cache's lock, so a read-only cache (a shared
    volume) serves as well as a writable one.
    """
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
