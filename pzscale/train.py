"""Training on a catalog's train split: a classifier (the built-in backbone end to end with kornia
augmentation, CPU-friendly, or a head on another model's stored embeddings). CLIP-style image-text
training with lineage text is ``pzscale.clip_train`` (``pzscale train --objective clip``).

Training data stream shard by shard (one shard's images in memory at a time), in an order
that depends only on the seed, so a run is reproducible and memory stays flat.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from pzscale.errors import CatalogError, ModelError
from pzscale.ml.augment import augment, make_augmentation, seed_for
from pzscale.ml.models import ModelCard, builtin_backbone, load_model, make_head, save_model
from pzscale.ml.preprocess import prepare_batch
from pzscale.ml.trainset import GREY_MEAN, GREY_STD, batches, split_rows, training_hash  # noqa: F401
from pzscale.schema import embedding_name
from pzscale.stage import Catalog, retry


def train(
    url: str | Catalog,
    out_dir: str,
    *,
    objective: str = "supervised",
    name: str | None = None,
    version: str = "1",
    backbone_dir: str | None = None,
    fine_tune: bool = False,
    head: str = "linear",
    epochs: int = 10,
    batch_size: int = 64,
    image_size: int = 64,
    embed_dim: int = 128,
    lr: float | None = None,
    seed: int = 0,
    augmentation: bool = True,
    device: str | None = None,
    storage_options: dict | None = None,
    log: Any = print,
) -> ModelCard:
    """Train on the catalog's ``train`` split and save a model directory with its card.

    Without ``backbone_dir``: the built-in CNN and a ``head`` end to end, with augmentation.
    With ``backbone_dir``: a ``head`` on that model's stored embeddings (``pzscale embed``
    first), a linear probe or an MLP; with ``fine_tune`` as well, that backbone and a new head
    end to end on the images, with augmentation, at the backbone's input size and normalisation.
    ``lr`` defaults to 3e-3 and ``device`` to the CPU.
    """
    if objective != "supervised":
        raise ModelError(f"unknown training objective {objective!r} for train(); it fits 'supervised', and "
                         "'clip' is pzscale.clip_train.train_clip (pzscale train --objective clip)")
    name, lr, device = name or "pzscale-cnn", 3e-3 if lr is None else lr, device or "cpu"
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cat = Catalog.open(url, storage_options)
    url = cat.url
    train_rows, val_rows = split_rows(cat, "train"), split_rows(cat, "val")
    classes = sorted({t for _, _, target, _ in train_rows for t in target})
    if len(classes) < 2:
        raise CatalogError(f"{url}: the train split has {len(classes)} label(s); need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    data_hash = training_hash(train_rows)
    if backbone_dir and not fine_tune:
        return _train_head(cat, out_dir, backbone_dir, train_rows, val_rows, index, data_hash, name=name,
                           version=version, head=head, epochs=epochs, lr=lr, log=log)
    group = cat.group()
    if backbone_dir:
        base = load_model(backbone_dir, device=device)
        backbone, c = base.backbone, base.card
        kind, arch, embed_dim, image_size, mean, std = c.kind, c.architecture, c.embed_dim, c.image_size, c.mean, c.std
    else:
        kind, arch, mean, std = "builtin", "pzcnn-small", GREY_MEAN, GREY_STD
        backbone = builtin_backbone(embed_dim).to(device)
    head_net = make_head(head, embed_dim, len(classes)).to(device)
    params = [*backbone.parameters(), *head_net.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-sum(len(r[1]) for r in train_rows) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    aug = make_augmentation() if augmentation else None
    for epoch in range(epochs):
        backbone.train()
        head_net.train()
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        for ids, y, pixels in batches(group, train_rows, index, batch_size, rng):
            x, _ = prepare_batch(pixels, size=image_size, mean=mean, std=std, device=device)
            if aug is not None:
                x, _ = augment(x, [seed_for(i, epoch, seed) for i in ids], aug)
            loss = torch.nn.functional.cross_entropy(head_net(backbone(x)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen, loss_sum = seen + len(ids), loss_sum + loss.item() * len(ids)
        backbone.eval()
        head_net.eval()
        acc = _accuracy(group, val_rows, index, lambda x: head_net(backbone(x)), image_size, mean, std, device,
                        batch_size)
        log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / max(seen, 1):.3f}, val accuracy {acc:.3f}, "
            f"{seen / (time.perf_counter() - started):,.0f} images/s")
    card = ModelCard(name=name, version=version, kind=kind, architecture=arch, embed_dim=embed_dim,
                     image_size=image_size, mean=mean, std=std, classes=classes, head=head,
                     training_data_sha256=data_hash,
                     extra={"epochs": epochs, "lr": lr, "seed": seed, "augmentation": augmentation,
                            "catalog": url if "://" not in url or url.startswith("file://") else "(remote)",
                            "fine_tuned_from": backbone_dir or ""})
    return save_model(out_dir, card, backbone.cpu(), head_net.cpu())


def _accuracy(group: Any, rows: list, index: dict[str, int], net: Any, size: int, mean: tuple, std: tuple,
              device: str, batch_size: int) -> float:
    correct = total = 0
    with torch.no_grad():
        for _, y, pixels in batches(group, rows, index, batch_size, np.random.default_rng(0)):
            x, _ = prepare_batch(pixels, size=size, mean=mean, std=std, device=device)
            correct += int((net(x).argmax(-1).cpu() == y).sum())
            total += len(y)
    return correct / total if total else float("nan")


def _train_head(cat: Catalog, out_dir: str, backbone_dir: str, train_rows: list, val_rows: list,
                index: dict[str, int], data_hash: str, *, name: str, version: str, head: str, epochs: int, lr: float,
                log: Any) -> ModelCard:
    backbone = load_model(backbone_dir)
    url, variable = cat.url, embedding_name(backbone.card.id)
    if variable not in cat.arrays():
        raise CatalogError(f"{url}: no {variable}; run pzscale embed with {backbone_dir} first")

    def load(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
        emb = [retry(cat.group()[variable].get_orthogonal_selection, (r,)) for _, r, _, _ in rows if len(r)]
        ys = [index[t] for _, _, target, _ in rows for t in target if t in index]
        keep = np.concatenate([np.isin(target, list(index)) for _, _, target, _ in rows if len(target)])
        x = torch.from_numpy(np.concatenate(emb).astype(np.float32)[keep])
        return x, torch.tensor(ys)

    x, y = load(train_rows)
    if torch.isnan(x).any():
        raise CatalogError(f"{url}: {variable} has missing rows in the train split; rerun pzscale embed")
    head_net = make_head(head, backbone.card.embed_dim, len(index))
    opt = torch.optim.AdamW(head_net.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs * 20):  # full-batch steps: a head on embeddings is cheap
        loss = torch.nn.functional.cross_entropy(head_net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    vx, vy = load(val_rows)
    with torch.no_grad():
        acc = float((head_net(vx).argmax(-1) == vy).float().mean()) if len(vy) else float("nan")
    log(f"head on {variable}: loss {loss.item():.3f}, val accuracy {acc:.3f}")
    card = ModelCard(**{**backbone.card.__dict__, "name": name, "version": version,
                        "classes": sorted(index, key=index.get), "head": head, "training_data_sha256": data_hash,
                        "weights": {}})
    # the backbone is saved again as safetensors (open_clip: the image tower only) beside the new head
    return save_model(out_dir, card, backbone.backbone.cpu(), head_net)
