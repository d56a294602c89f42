"""Train a source model the way a user would outside tlsearch, and save its state dict.

    python examples/train_source.py examples/resnet-folders.toml [--epochs 3]

Reads the study file for the model, the source folder and the image options, trains the model on
the source images with plain PyTorch (Adam, cross-entropy), and writes ``pretrain.checkpoint``:
for the ``resnet`` plug-in under torchvision's names (``conv1``, ``layer1``, ``fc``), so the study
exercises the plug-in's key adapter as a torchvision checkpoint would. Uses tlsearch's public API
only to read the same data the study will see.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tlsearch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study file (pretrain.checkpoint is written)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plugin", action="append", default=[], help="plug-in modules to load")
    args = parser.parse_args(argv)

    tlsearch.load_plugins(args.plugin)
    cfg = tlsearch.load_config(args.study)
    if cfg.pretrain.checkpoint is None or cfg.data.source is None:
        parser.error(f"{args.study}: needs data.source and pretrain.checkpoint")
    task = tlsearch.load_task(cfg.data)
    assert task.source is not None
    torch.manual_seed(args.seed)
    model = tlsearch.create_model(cfg.model, task.input_shape, task.source_classes)
    x, y = torch.from_numpy(task.source.x), torch.from_numpy(task.source.y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}", file=sys.stderr)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    state = model.state_dict()
    if cfg.model.name == "resnet":
        from tlsearch_resnet import torchvision_names

        state = torchvision_names(state)
    cfg.pretrain.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cfg.pretrain.checkpoint)
    print(
        f"wrote {cfg.pretrain.checkpoint} ({cfg.model.name}, {len(y)} source images, "
        f"train accuracy {accuracy:.3f}, {time.perf_counter() - t0:.0f}s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
