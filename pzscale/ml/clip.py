"""CLIP model directories (open_clip image and text towers): configs, loading, tokenizer, prompts.

A CLIP model directory is an ordinary pzscale model directory of kind ``open_clip`` whose weight file holds
the *whole* model (image and text towers). Its architecture is an open_clip built-in config name
(``ViT-B-16`` for BioCLIP, the released Planktonzilla models or a random ViT-B-16 imported with
``models.import_checkpoint``), or a custom config recorded in the card under ``extra["open_clip_model_cfg"]``
(the tiny CPU architecture ``pzscale-clip-tiny``). Nothing is downloaded: the tokenizer is open_clip's
``SimpleTokenizer`` whose BPE vocabulary ships inside the package; configs needing a Hugging Face tokenizer
or text model are refused. Weights are read only through ``models.read_state_dict`` (safetensors, or
``torch.load(weights_only=True)``). Used by the CLIP-style training and the zero-shot stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pzscale.errors import ModelError, one_line
from pzscale.ml.models import ModelCard, read_state_dict, save_model
from pzscale.ml.trainset import GREY_MEAN, GREY_STD

PROMPT = "a photo of a {}"
TINY_ARCHITECTURE = "pzscale-clip-tiny"
# ~4.6 M parameters (3.2 M of them the 49,408-token embedding table): a 1.3 M-parameter ResNet image tower
# at 64 px and a 2-layer text transformer over 64 tokens (long lineages with the prompt reach ~45); trains on a
# CPU in seconds, for tests and small catalogs.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
LOGIT_SCALE_MAX = float(np.log(100.0))  # as open_clip_train: temperature never below 0.01


# ---------------------------------------------------------------- model directories


def open_clip_config(card: ModelCard, where: str | Path = "") -> dict[str, Any]:
    """The open_clip model config of a card: the built-in config of its architecture, or the recorded one."""
    import open_clip

    where = where or card.name
    if card.kind != "open_clip":
        raise ModelError(f"{where}: a {card.kind} model has no text tower; zero-shot needs an open_clip CLIP model")
    recorded = card.extra.get("open_clip_model_cfg")
    if recorded:
        cfg = copy.deepcopy(recorded)
    elif card.architecture in open_clip.list_models():
        cfg = copy.deepcopy(open_clip.get_model_config(card.architecture))
    else:
        raise ModelError(f"{where}: unknown open_clip architecture {card.architecture!r} and no "
                         "extra.open_clip_model_cfg in the card")
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name") or "siglip" in card.architecture.lower():
        raise ModelError(f"{where}: {card.architecture} needs a Hugging Face tokenizer or text model, which would "
                         "be downloaded; only open_clip's built-in SimpleTokenizer text towers are supported")
    return cfg


def _build(card: ModelCard, cfg: dict[str, Any], where: str | Path) -> nn.Module:
    import open_clip

    try:
        if card.architecture in open_clip.list_models() and not card.extra.get("open_clip_model_cfg"):
            return open_clip.create_model(card.architecture, pretrained=None)
        params = dict(cfg)
        cls = open_clip.CustomTextCLIP if params.pop("custom_text", False) else open_clip.CLIP
        return cls(**params)
    except Exception as e:  # noqa: BLE001 - open_clip constructors raise anything on a bad config
        raise ModelError(f"{where}: cannot build {card.architecture}: {type(e).__name__}: {one_line(e)}") from None


def _weights(model_dir: Path, card: ModelCard) -> Path:
    name = card.weights.get("backbone", "")
    if not name or Path(name).name != name:
        raise ModelError(f"{model_dir}/model_card.json: no plain backbone weight file named")
    return model_dir / name


def _weight_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: corrupt or unreadable safetensors file: {one_line(e)}") from None
    return list(read_state_dict(path))


def has_text_tower(model_dir: str | Path) -> bool:
    """True for an open_clip model directory whose weights include the text tower (zero-shot capable)."""
    model_dir = Path(model_dir)
    card = ModelCard.load(model_dir)
    if card.kind != "open_clip":
        return False
    return any(not k.removeprefix("module.").startswith("visual.") for k in _weight_keys(_weights(model_dir, card)))


@dataclass
class LoadedClip:
    """A whole open_clip CLIP model in eval mode on one device, with its tokenizer and card."""

    card: ModelCard
    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    device: torch.device
    text_cache: dict = field(default_factory=dict)  # text features of class sets, kept with the model

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised images -> (N, D) image features (not L2-normalised), float32."""
        return self.model.encode_image(x.to(self.device, torch.float32)).float()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (len(texts), D) L2-normalised text features, float32."""
        parts = [self.model.encode_text(self.tokenizer(list(texts[i : i + batch_size])).to(self.device),
                                        normalize=True).float() for i in range(0, len(texts), batch_size)]
        return torch.cat(parts) if parts else torch.zeros((0, self.card.embed_dim), device=self.device)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


def tokenizer_for(cfg: dict[str, Any]) -> Callable[[Sequence[str]], torch.Tensor]:
    import open_clip

    text = cfg.get("text_cfg", {})
    return open_clip.SimpleTokenizer(context_length=text.get("context_length", 77), **text.get("tokenizer_kwargs", {}))


def load_clip(model_dir: str | Path, *, device: str | torch.device = "cpu") -> LoadedClip:
    """Load the whole CLIP model of ``model_dir`` (image and text towers) onto ``device`` in eval mode.

    ModelError, naming the file, for a model that is not open_clip, weights holding only the image tower,
    weights that do not fit the architecture, or an architecture that would need a download.
    """
    model_dir = Path(model_dir)
    card = ModelCard.load(model_dir)
    cfg = open_clip_config(card, model_dir)
    path = _weights(model_dir, card)
    state = read_state_dict(path)
    if all(k.startswith("visual.") for k in state):
        raise ModelError(f"{path}: holds only the image tower; zero-shot needs the full open_clip checkpoint "
                         "(import the hub's open_clip_model.safetensors, not a saved image tower)")
    model = _build(card, cfg, model_dir)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        raise ModelError(f"{path}: weights do not fit {card.architecture}: {len(missing)} missing (e.g. "
                         f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(misshaped)} "
                         f"mis-shaped (e.g. {misshaped[:2]})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    device = torch.device(device)
    return LoadedClip(card, model.to(device).eval(), tokenizer_for(cfg), device)


def random_clip(out_dir: str | Path, *, name: str = "random-clip", version: str = "1", image_size: int = 64,
                seed: int = 0) -> ModelCard:
    """A randomly initialised CLIP of the tiny architecture, saved as a model directory: the chance-level
    baseline for zero-shot and few-shot results (``compare`` accepts it like any model)."""
    import open_clip

    cfg = copy.deepcopy(TINY_CONFIG)
    cfg["vision_cfg"]["image_size"] = image_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
    card = ModelCard(name=name, version=version, kind="open_clip", architecture=TINY_ARCHITECTURE,
                     embed_dim=cfg["embed_dim"], image_size=image_size, mean=GREY_MEAN, std=GREY_STD,
                     extra={"objective": "none (random initialisation)", "seed": seed, "open_clip_model_cfg": cfg})
    return save_model(out_dir, card, model)
