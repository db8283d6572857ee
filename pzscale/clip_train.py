"""CLIP-style training with lineage text (open_clip), and the CLIP model directories that zero-shot reads.

An image's text is its target label: the lineage (lowercase ranks joined by spaces), or the proposed label
where there is no lineage (detritus, bubble), as Planktonzilla trains its released models (no template at
training time). The image and text towers learn with open_clip's contrastive ``ClipLoss``; images stream
shard by shard in a seeded order with the same kornia augmentation as ``pzscale.train``.

A CLIP model directory is an ordinary pzscale model directory of kind ``open_clip`` whose weight file holds
the *whole* model (image and text towers). Its architecture is an open_clip built-in config name
(``ViT-B-16`` for BioCLIP, the released Planktonzilla models or a random ViT-B-16 imported with
``models.import_checkpoint``), or a custom config recorded in the card under ``extra["open_clip_model_cfg"]``
(the tiny CPU architecture ``pzscale-clip-tiny`` trained here). Nothing is downloaded: the tokenizer is
open_clip's ``SimpleTokenizer`` whose BPE vocabulary ships inside the package, and configs needing a
Hugging Face tokenizer or text model are refused. Weights are read only through ``models.read_state_dict``
(safetensors, or ``torch.load(weights_only=True)``).

Models of a custom architecture work with ``zeroshot`` (which also stores their image embeddings) but not
with ``embed``/``classify``, whose loader (``models.load_model``) knows only built-in architectures.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from pzscale.errors import CatalogError
from pzscale.ml.augment import augment, make_augmentation, seed_for
from pzscale.ml.clip import (  # noqa: F401 - re-exported: the CLIP model API lives in pzscale.ml.clip
    LOGIT_SCALE_MAX,
    PROMPT,
    TINY_ARCHITECTURE,
    TINY_CONFIG,
    LoadedClip,
    has_text_tower,
    load_clip,
    open_clip_config,
    random_clip,
    tokenizer_for,
)
from pzscale.ml.models import ModelCard, save_model
from pzscale.ml.preprocess import prepare_batch
from pzscale.ml.trainset import GREY_MEAN, GREY_STD, batches, split_rows, training_hash
from pzscale.stage import Catalog

__all__ = [
    "PROMPT",
    "TINY_ARCHITECTURE",
    "TINY_CONFIG",
    "LoadedClip",
    "has_text_tower",
    "load_clip",
    "open_clip_config",
    "random_clip",
    "train_clip",
]

# ---------------------------------------------------------------- training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # as open_clip_train: no weight decay on gains, biases, norms and the temperature
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
         else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def train_clip(
    url: str | Catalog,
    out_dir: str,
    *,
    name: str = "pzscale-clip",
    version: str = "1",
    init_dir: str | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    image_size: int | None = None,
    lr: float | None = None,
    weight_decay: float = 0.2,
    seed: int = 0,
    augmentation: bool = True,
    device: str | None = None,
    storage_options: dict | None = None,
    log: Any = print,
) -> ModelCard:
    """CLIP-style training on the catalog's ``train`` split; saves a CLIP model directory and returns its card.

    Without ``init_dir``: the tiny architecture from scratch (``image_size`` default 64, ``lr`` 2e-3), for a
    CPU. With ``init_dir``: continue from that CLIP model directory (a ViT-B-16 from OpenAI/BioCLIP weights,
    as Planktonzilla; ``lr`` default 1e-5, its own input size and normalisation). ``device`` None takes the
    GPU when there is one (with bf16 autocast). Both towers are trained; the loss is open_clip's ``ClipLoss``
    over the batch, each image's text being its lineage.
    """
    import open_clip

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cat = Catalog.open(url, storage_options)
    url = cat.url
    train_rows, val_rows = split_rows(cat, "train"), split_rows(cat, "val")
    classes = sorted({t for _, _, target, _ in train_rows for t in target})
    if len(classes) < 2:
        raise CatalogError(f"{url}: the train split has {len(classes)} label(s); need at least 2")
    index = {c: i for i, c in enumerate(classes)}
    if init_dir:
        base = load_clip(init_dir, device=device)
        model, tokenizer, card0 = base.model, base.tokenizer, base.card
        architecture, cfg = card0.architecture, card0.extra.get("open_clip_model_cfg")
        image_size, mean, std, embed_dim = card0.image_size, card0.mean, card0.std, card0.embed_dim
        lr = lr or 1e-5
    else:
        architecture, cfg = TINY_ARCHITECTURE, copy.deepcopy(TINY_CONFIG)
        cfg["vision_cfg"]["image_size"] = image_size = image_size or cfg["vision_cfg"]["image_size"]
        model = open_clip.CLIP(**cfg).to(device)
        tokenizer, mean, std, embed_dim = tokenizer_for(cfg), GREY_MEAN, GREY_STD, cfg["embed_dim"]
        lr = lr or 2e-3
    tokens = tokenizer(classes).to(device)
    group = cat.group()
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr)
    steps = epochs * max(1, -(-sum(len(r[1]) for r in train_rows) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = open_clip.ClipLoss()
    aug = make_augmentation() if augmentation else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    for epoch in range(epochs):
        model.train()
        started, seen, loss_sum = time.perf_counter(), 0, 0.0
        for ids, y, pixels in batches(group, train_rows, index, batch_size, rng):
            x, _ = prepare_batch(pixels, size=image_size, mean=mean, std=std, device=device)
            if aug is not None:
                x, _ = augment(x, [seed_for(i, epoch, seed) for i in ids], aug)
            # one text-tower pass per distinct lineage of the batch; the loss sees one text per image
            distinct, inverse = torch.unique(y, return_inverse=True)
            with autocast:
                image_features = model.encode_image(x, normalize=True)
                text_features = model.encode_text(tokens[distinct.to(device)], normalize=True)[inverse.to(device)]
                loss = loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            seen, loss_sum = seen + len(ids), loss_sum + loss.item() * len(ids)
        model.eval()
        acc = _zero_shot_accuracy(group, val_rows, index, model, tokens, image_size, mean, std, device, batch_size)
        log(f"epoch {epoch + 1}/{epochs}: clip loss {loss_sum / max(seen, 1):.3f}, val accuracy (lineage text) "
            f"{acc:.3f}, {seen / (time.perf_counter() - started):,.0f} images/s")
    card = ModelCard(name=name, version=version, kind="open_clip", architecture=architecture, embed_dim=embed_dim,
                     image_size=image_size, mean=mean, std=std, classes=classes, head=None,
                     training_data_sha256=training_hash(train_rows),
                     extra={"objective": "clip", "text": "lineage", "epochs": epochs, "lr": lr, "seed": seed,
                            "batch_size": batch_size, "weight_decay": weight_decay, "augmentation": augmentation,
                            "catalog": url if "://" not in url or url.startswith("file://") else "(remote)",
                            "fine_tuned_from": init_dir or "",
                            **({"open_clip_model_cfg": cfg} if cfg else {})})
    return save_model(out_dir, card, model.cpu())


def _zero_shot_accuracy(group: Any, rows: list, index: dict[str, int], model: nn.Module, tokens: torch.Tensor,
                        size: int, mean: tuple, std: tuple, device: str, batch_size: int) -> float:
    """Val images against the training lineages as texts (Planktonzilla's in-training evaluation)."""
    correct = total = 0
    with torch.no_grad():
        text = model.encode_text(tokens, normalize=True).float()
        known = [(start, r[keep], t[keep], i[keep]) for start, r, t, i in rows for keep in [np.isin(t, list(index))]]
        for _, y, pixels in batches(group, known, index, batch_size, np.random.default_rng(0)):
            x, _ = prepare_batch(pixels, size=size, mean=mean, std=std, device=device)
            predicted = (model.encode_image(x, normalize=True).float() @ text.T).argmax(-1).cpu()
            correct += int((predicted == y).sum())
            total += len(y)
    return correct / total if total else float("nan")
