"""Model directories: a JSON card plus weight files, loaded into an image backbone and an optional class head.

A model directory holds ``model_card.json`` and the weight files it names. Three kinds of backbone:

- ``builtin``: a small CNN (``builtin_backbone``) that trains on a CPU in minutes, for tests and small catalogs;
- ``open_clip``: the image tower of an open_clip model (the released Planktonzilla CLIP models are of this kind);
- ``timm``: any timm image model, without its classifier.

Nothing is ever downloaded: architectures are built from the libraries' own configs and weights come only
from the directory. Pickled checkpoints are read with ``torch.load(weights_only=True)``, which refuses any
pickle that would run code; such files raise ``ModelError``, they are never loaded another way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pzscale.errors import ModelError, one_line
from pzscale.ml.weights import (
    OpenClipImageTower,
    build_meta,
    check_keys,
    copy_with_sha256,
    declared_width,
    drop_timm_classifier,
    file_sha256,
    load_strict,
    open_clip_expected,
    open_clip_model,
    open_clip_tower,
    output_width,
    read_state_dict,
    timm_backbone,
    timm_model,
)

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "LoadedModel",
    "ModelCard",
    "OpenClipImageTower",
    "builtin_backbone",
    "import_checkpoint",
    "load_model",
    "make_head",
    "read_state_dict",
    "save_model",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

CARD_FILE = "model_card.json"
KINDS = ("builtin", "open_clip", "timm")
HEADS = ("linear", "mlp")
BUILTIN_ARCHITECTURE = "pzcnn-small"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# ---------------------------------------------------------------- the card


@dataclass
class ModelCard:
    """What a model is, how to feed it and which files hold it; stored as ``model_card.json``."""

    name: str
    version: str
    kind: str
    architecture: str
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: list[str] = field(default_factory=list)
    head: str | None = None
    training_data_sha256: str = ""
    weights: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    created: str = ""
    pzscale: str = ""

    def __post_init__(self) -> None:
        # Every field is checked (and lists turned into the promised tuples) so a bad card fails here, in one
        # line, not later in a shard as an IndexError or NaN probabilities.
        problems = _normalise_fields(self)
        if problems:
            raise ModelError(f"invalid model card {self.name!r}: {'; '.join(problems)}")

    @property
    def id(self) -> str:
        """``name-version`` lowercased with anything outside ``[a-z0-9_.-]`` replaced, safe in a Zarr array name."""
        safe = re.sub(r"[^a-z0-9_.-]+", "-", f"{self.name}-{self.version}".lower())
        return re.sub(r"-{2,}", "-", safe).strip("-.") or "model"

    def to_dict(self) -> dict[str, Any]:
        """The card as plain JSON types."""
        return dataclasses.asdict(self)

    def save(self, model_dir: str | os.PathLike) -> None:
        """Write ``model_card.json`` into ``model_dir`` (created if needed), replacing any previous card atomically."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".{CARD_FILE}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(model_dir / CARD_FILE)

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> ModelCard:
        """Read ``model_dir/model_card.json``; ModelError if it is missing, not JSON, or not a valid card."""
        path = Path(model_dir) / CARD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            what = "no model card (model_card.json)" if Path(model_dir).is_dir() else "no such model directory"
            raise ModelError(f"{path}: {what}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: unreadable model card: {one_line(e)}") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path}: a model card must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f))
        if unknown or missing:
            parts = ([f"unknown fields {unknown}"] if unknown else []) + (
                [f"missing fields {missing}"] if missing else []
            )
            raise ModelError(f"{path}: invalid model card: {'; '.join(parts)}")
        problems = _normalise_fields(data)
        if problems:
            raise ModelError(f"{path}: {'; '.join(problems)}")
        return cls(**data)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


# ---------------------------------------------------------------- the card's schema
# Each checker returns the value in its stored form or raises ValueError saying what the field must be.


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _nonempty_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _one_of(*choices: str | None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, str | None) or value not in choices:
            raise ValueError(f"must be one of {', '.join('null' if c is None else repr(c) for c in choices)}")
        return value

    return check


def _positive_int(value: Any) -> int:
    # bool is an Integral; numbers.Integral admits numpy integers, which training code may pass.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError("must be a whole number > 0")
    return int(value)


def _rgb(positive: bool) -> Callable[[Any], tuple[float, ...]]:
    # preprocess normalises (N, 3, S, S) images channel by channel, so exactly one value per channel.
    what = "3 values (R, G, B), finite numbers" + (" > 0" if positive else "")

    def check(value: Any) -> tuple[float, ...]:
        if not isinstance(value, list | tuple) or len(value) != 3:
            raise ValueError(f"must be {what}")
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
            raise ValueError(f"must be {what}")
        floats = tuple(float(v) for v in value)
        if not all(math.isfinite(v) and (v > 0 or not positive) for v in floats):
            raise ValueError(f"must be {what}")
        return floats

    return check


def _classes(value: Any) -> list[str]:
    # A string is a sequence too: "abc" would pass a length check and index as 3 one-letter classes.
    if not isinstance(value, list | tuple) or not all(isinstance(c, str) and c.strip() for c in value):
        raise ValueError("must be a list of non-empty strings")
    repeated = sorted({c for c in value if value.count(c) > 1})
    if repeated:
        raise ValueError(f"must name each class once ({', '.join(map(repr, repeated[:3]))} repeated)")
    return list(value)


def _weight_files(value: Any) -> dict[str, str]:
    ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())
    if not ok:
        raise ValueError('must be an object of role -> file name strings, e.g. {"backbone": "backbone.safetensors"}')
    return value


def _object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


CARD_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "name": _nonempty_text,
    "version": _text,
    "kind": _one_of(*KINDS),
    "architecture": _nonempty_text,
    "embed_dim": _positive_int,
    "image_size": _positive_int,
    "mean": _rgb(positive=False),
    "std": _rgb(positive=True),  # 0 or NaN would make every normalised pixel inf/NaN
    "classes": _classes,
    "head": _one_of(*HEADS, None),
    "training_data_sha256": _text,
    "weights": _weight_files,
    "extra": _object,
    "created": _text,
    "pzscale": _text,
}


def _normalise_fields(card: ModelCard | dict[str, Any]) -> list[str]:
    """Check every present field against ``CARD_SCHEMA``, store its normalised value, return the problems."""
    values = card if isinstance(card, dict) else vars(card)
    problems = []
    for name, check in CARD_SCHEMA.items():
        if name not in values:
            continue
        try:
            values[name] = check(values[name])
        except ValueError as e:
            problems.append(f"field {name!r} {e}, but the card has {name} {one_line(repr(values[name]), 80)}")
    return problems


# ---------------------------------------------------------------- networks


def builtin_backbone(embed_dim: int = 128) -> nn.Module:
    """A small CNN (~0.6 M parameters) for 64..128 px plankton images that trains on a CPU in minutes.

    Four stride-2 stages (32, 64, 128, 256 channels) with batch norm, global average pooling and a linear
    projection to ``embed_dim``. Accepts (N, 3, S, S) for any S >= 32 (pooling makes it size-agnostic).
    """

    def conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv(3, 32, 2),
        *conv(32, 64, 2),
        *conv(64, 64, 1),
        *conv(64, 128, 2),
        *conv(128, 128, 1),
        *conv(128, 256, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, embed_dim),
    )


def make_head(kind: str, embed_dim: int, n_classes: int) -> nn.Module:
    """A class head on embeddings: ``"linear"``, or ``"mlp"`` (one hidden layer of ``embed_dim``, ReLU, dropout 0.1)."""
    if n_classes < 1:
        raise ModelError(f"a {kind} head needs at least one class, got {n_classes}")
    if kind == "linear":
        return nn.Linear(embed_dim, n_classes)
    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.ReLU(inplace=True), nn.Dropout(0.1), nn.Linear(embed_dim, n_classes)
        )
    raise ModelError(f"unknown head kind {kind!r}; use one of {', '.join(HEADS)}")


# ---------------------------------------------------------------- loaded models


class LoadedModel:
    """A backbone (and optional head) in eval mode on one device, with the card that describes it."""

    def __init__(
        self, card: ModelCard, backbone: nn.Module, head: nn.Module | None, device: str | torch.device = "cpu"
    ) -> None:
        self.card = card
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.head = head.to(self.device).eval() if head is not None else None

    def __repr__(self) -> str:
        return f"LoadedModel({self.card.id}, {self.card.kind} {self.card.architecture}, device={self.device})"

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised float images -> (N, embed_dim) float32 embeddings on ``device``."""
        if self.backbone.training:  # a caller may have switched it to train mode (dropout, batch norm updates)
            self.backbone.eval()
        return self.backbone(x.to(self.device, torch.float32))

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised float images -> (N, len(card.classes)) class logits on ``device``."""
        if self.head is None:
            raise ModelError(f"model {self.card.id} has no class head; use embed() or a model with a head")
        if self.head.training:
            self.head.eval()
        return self.head(self.embed(x))


def save_model(
    model_dir: str | os.PathLike, card: ModelCard, backbone: nn.Module, head: nn.Module | None = None
) -> ModelCard:
    """Write ``backbone.safetensors`` (and ``head.safetensors``) and the card into ``model_dir``.

    Fills in ``card.weights``, ``card.created`` and ``card.pzscale`` (and the weight files' sha256 under
    ``card.extra["weights_sha256"]``), saves the card and returns it (the same object).
    """
    from safetensors.torch import save_file

    if (head is None) != (card.head is None):
        raise ModelError(
            f"model {card.id}: card.head is {card.head!r} but a head module was {'not ' if head is None else ''}given"
        )
    if head is not None and not card.classes:
        raise ModelError(f"model {card.id}: a head needs card.classes (one lineage string per output)")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    card.weights = {}
    hashes = {}
    for role, module in (("backbone", backbone), ("head", head)):
        path = model_dir / f"{role}.safetensors"
        if module is None:
            path.unlink(missing_ok=True)  # a stale head from an earlier save must not be picked up
            continue
        # safetensors needs contiguous, unshared CPU tensors.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"pzscale_model": card.id, "role": role})
        tmp.replace(path)
        card.weights[role] = path.name
        hashes[role] = file_sha256(path)
    card.extra = {**card.extra, "weights_sha256": hashes}
    card.created = datetime.now(UTC).isoformat(timespec="seconds")
    card.pzscale = package_version("pzscale")
    card.save(model_dir)
    return card


def load_model(model_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model in ``model_dir`` onto ``device`` in eval mode.

    Raises ModelError naming the file for a missing or invalid card, a missing, corrupt or unsafe weight file,
    or weights that do not fit the card's architecture (strict: no missing, unexpected or mis-shaped tensor).
    """
    model_dir = Path(model_dir)
    card_path = model_dir / CARD_FILE
    card = ModelCard.load(model_dir)
    backbone_path = _weight_path(model_dir, card, "backbone")
    state = read_state_dict(backbone_path)
    if card.kind == "builtin":
        if card.architecture != BUILTIN_ARCHITECTURE:
            raise ModelError(f"{card_path}: unknown builtin architecture {card.architecture!r}")
        backbone = builtin_backbone(card.embed_dim)
        out_key = _linear_weight_keys(backbone)[-1]
        width = _rows(state.get(out_key))
        if width is not None and width != card.embed_dim:  # say which card field is wrong, not only which tensor
            raise ModelError(
                f"{backbone_path}: weights do not fit {card.architecture}: mis-shaped {out_key}: "
                f"field 'embed_dim' of {card_path} is {card.embed_dim} but the weights give {width}"
            )
        load_strict(backbone, state, backbone_path, card.architecture)
    elif card.kind == "open_clip":
        backbone = open_clip_tower(card.architecture, state, backbone_path)
    else:
        backbone = timm_backbone(card.architecture, state, backbone_path)
    width = declared_width(backbone)
    if width is not None and width != card.embed_dim:
        raise ModelError(
            f"{card_path}: embed_dim is {card.embed_dim} but {card.architecture} gives {width}"
        )
    head = None
    if card.head is not None:
        if not card.classes:
            raise ModelError(f"{card_path}: head {card.head!r} but no classes")
        head_path = _weight_path(model_dir, card, "head")
        head = make_head(card.head, card.embed_dim, len(card.classes))
        head_state = read_state_dict(head_path)
        _check_head_sizes(card, head, head_state, card_path, head_path)
        load_strict(head, head_state, head_path, f"{card.head} head")
    return LoadedModel(card, backbone, head, device)


def _check_head_sizes(
    card: ModelCard, head: nn.Module, state: dict[str, torch.Tensor], card_path: Path, head_path: Path
) -> None:
    # A head with more outputs than classes would index past card.classes in a shard; say so against the card.
    keys = _linear_weight_keys(head)
    outputs, inputs = _rows(state.get(keys[-1])), _columns(state.get(keys[0]))
    if outputs is not None and outputs != len(card.classes):
        raise ModelError(
            f"{card_path}: field 'classes' has {len(card.classes)} entries but {head_path.name} gives {outputs} outputs"
        )
    if inputs is not None and inputs != card.embed_dim:
        raise ModelError(
            f"{card_path}: field 'embed_dim' is {card.embed_dim} but {head_path.name} takes {inputs} inputs"
        )


def _linear_weight_keys(module: nn.Module) -> list[str]:
    """State dict keys of the weights of ``module``'s linear layers, in order."""
    return [f"{name}.weight" if name else "weight" for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def _rows(weight: torch.Tensor | None) -> int | None:
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _columns(weight: torch.Tensor | None) -> int | None:
    return int(weight.shape[1]) if weight is not None and weight.ndim == 2 else None


def import_checkpoint(
    path: str | os.PathLike,
    *,
    kind: str,
    architecture: str,
    out_dir: str | os.PathLike,
    name: str,
    version: str,
    image_size: int = 224,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
) -> ModelCard:
    """Wrap an external open_clip or timm checkpoint into a model directory.

    The checkpoint is validated first (read safely, keys and shapes checked against ``architecture``), then
    copied into ``out_dir`` as ``backbone<suffix>`` and the card written. ``embed_dim`` is the output width of
    the built architecture on an ``image_size`` input. OpenAI-initialised CLIP models use QuickGELU: import them
    with the ``-quickgelu`` architecture (e.g. ``ViT-B-16-quickgelu``), which the weights alone cannot reveal.
    """
    path = Path(path)
    if kind not in ("open_clip", "timm"):
        raise ModelError(f"{path}: cannot import kind {kind!r}; use 'open_clip' or 'timm' (builtin: save_model)")
    suffix = path.suffix.lower()
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise ModelError(f"{path}: unknown checkpoint format; expected .safetensors or {', '.join(PICKLE_SUFFIXES)}")
    state = read_state_dict(path)
    if kind == "open_clip":
        model = build_meta(lambda: open_clip_model(architecture), path)
        check_keys(open_clip_expected(model, state), state, path, architecture)
        tower: nn.Module = OpenClipImageTower(model.visual)
    else:
        tower = build_meta(lambda: timm_model(architecture), path)
        check_keys(tower.state_dict(), drop_timm_classifier(tower, state), path, architecture)
    embed_dim = output_width(tower, image_size, path, architecture)
    del state, tower

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"backbone{suffix}"
    digest = copy_with_sha256(path, target)
    card = ModelCard(
        name=name,
        version=version,
        kind=kind,
        architecture=architecture,
        embed_dim=embed_dim,
        image_size=image_size,
        mean=mean,
        std=std,
        weights={"backbone": target.name},
        extra={"weights_sha256": {"backbone": digest}, "imported_from": str(path)},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        pzscale=package_version("pzscale"),
    )
    card.save(out_dir)
    return card


# ---------------------------------------------------------------- reading weights


def _weight_path(model_dir: Path, card: ModelCard, role: str) -> Path:
    name = card.weights.get(role)
    if not name:
        raise ModelError(f"{model_dir / CARD_FILE}: the card names no {role} weight file")
    if Path(name).name != name:  # a card must not point outside its directory
        raise ModelError(f"{model_dir / CARD_FILE}: {role} weight file {name!r} is not a plain file name")
    return model_dir / name


# ---------------------------------------------------------------- building without initialising


# ---------------------------------------------------------------- open_clip and timm


# ---------------------------------------------------------------- small helpers


