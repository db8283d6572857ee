"""Weight files read safely and checked against an architecture; backbones of the open_clip and timm kinds.

Pickled checkpoints are read with ``torch.load(weights_only=True)``, which refuses any pickle that would run
code; such files raise ``ModelError`` naming the file. Architectures are built on the meta device first, so a
checkpoint whose keys or shapes do not fit is refused before any memory is spent on it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pzscale.errors import ModelError, one_line


class OpenClipImageTower(nn.Module):
    """The image tower of an open_clip CLIP model: ``forward(x) == clip.encode_image(x)``.

    Only the tower is kept (the text tower is most of a CLIP model's memory for the small ViTs). Its state
    dict keys are those of the full model (``visual.*``), so a saved tower reloads through the same path.
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a ``torch.save`` pickle, never running pickled code.

    Accepts a raw state dict or a training checkpoint ``{"state_dict": ..., ...}``; a leading ``module.``
    (DistributedDataParallel) is stripped from keys. Raises ModelError naming ``path`` otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weight file not found")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{path}: corrupt or unreadable safetensors file: {one_line(e)}") from None
    else:
        loaded = torch_load_weights_only(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelError(f"{path}: not a state dict (a mapping of names to tensors, or one under 'state_dict')")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def torch_load_weights_only(path: Path) -> Any:
    # mmap: a training checkpoint's optimizer state (2x the weights) is never read into memory.
    for mmap in (True, False):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e):
                raise ModelError(
                    f"{path}: refused: the checkpoint needs arbitrary code to unpickle ({weights_only_reason(e)}); "
                    "pzscale only reads plain tensors from pickles"
                ) from None
            raise ModelError(f"{path}: corrupt checkpoint: {without_advice(e)}") from None
        except RuntimeError as e:
            if mmap and "mmap can only be used" in str(e):
                continue  # legacy (pre-zip) torch.save format: read it whole
            raise ModelError(f"{path}: corrupt checkpoint: {without_advice(e)}") from None
        except Exception as e:  # noqa: BLE001 - torch raises KeyError, EOFError, ... on garbage; all mean "corrupt"
            raise ModelError(
                f"{path}: corrupt or unreadable checkpoint: {type(e).__name__}: {without_advice(e)}"
            ) from None
    raise AssertionError("unreachable")


# Sentences of torch's refusal text that advise loading anyway (weights_only=False, allowlisting the global):
# unsafe for files nobody vetted, so they never reach a pzscale message.
_ADVICE = re.compile(r"weights_only|safe_globals|allowlist|trust|file an issue|documentation of torch\.load", re.I)


def weights_only_reason(error: Exception) -> str:
    """What the refused pickle wanted (the global it imports, or the opcode), without torch's advice."""
    text = str(error)
    if m := re.search(r"GLOBAL (\S+)(?: whose module \S+ is blocked| was not an allowed global)", text):
        return f"it imports {m[1]}"
    if m := re.search(r"Unsupported operand (\d+)", text):
        return f"unsupported pickle opcode {m[1]}"
    return without_advice(text.split("WeightsUnpickler error:", 1)[-1]) or "unknown reason"


def without_advice(error: object) -> str:
    """``one_line(error)`` without the sentences that advise loading the file unsafely."""
    sentences = re.split(r"(?<=[.:])\s+", " ".join(str(error).split()))
    return one_line(" ".join(s for s in sentences if not _ADVICE.search(s)))


def load_strict(
    module: nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, assign: bool = False
) -> None:
    check_keys(module.state_dict(), state, path, what)
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit {what}: {one_line(e)}") from None


def check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """ModelError summarising, in one line, every missing, unexpected and mis-shaped tensor."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    if problems:
        raise ModelError(f"{path}: weights do not fit {what}: {'; '.join(problems)}")


def build_meta(build: Callable[[], nn.Module], path: Path) -> nn.Module:
    """Build a network on the meta device: shapes only, no memory, no random initialisation (seconds for a ViT)."""
    try:
        with torch.device("meta"):
            return build()
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - library constructors raise anything on a bad name or config
        raise ModelError(f"{path}: cannot build the architecture: {type(e).__name__}: {one_line(e)}") from None


def materialise(build: Callable[[], nn.Module], state: dict[str, torch.Tensor], path: Path, what: str) -> nn.Module:
    """Build ``build()`` and load ``state`` strictly into it, skipping the random initialisation when possible.

    The meta-device build takes the loaded tensors directly (``assign=True``). A network that keeps tensors
    outside its state dict (non-persistent buffers, plain tensor attributes) would still hold meta tensors
    after that; it is rebuilt for real instead, so that no placeholder ever reaches a forward pass.
    """
    # Own float32 copies: the model stays float32 whatever the file holds, and does not keep the
    # checkpoint's memory map alive (a file overwritten in place would crash a mapped model).
    state = {k: v.to(torch.float32, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    module = build_meta(build, path)
    load_strict(module, state, path, what, assign=True)
    if not any(meta_tensors(module)):
        return module
    module = build()
    load_strict(module, state, path, what)
    return module


def declared_width(backbone: nn.Module) -> int | None:
    """The embedding width a built backbone declares (open_clip ``output_dim``, timm ``num_features``), if any."""
    if isinstance(backbone, OpenClipImageTower):
        return getattr(backbone.visual, "output_dim", None)
    return getattr(backbone, "num_features", None)


def meta_tensors(module: nn.Module) -> Iterator[str]:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta:
            yield name
    for module_name, sub in module.named_modules():
        for attr, value in vars(sub).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                yield f"{module_name}.{attr}"


def output_width(backbone: nn.Module, image_size: int, path: Path, architecture: str) -> int:
    """Embedding width of ``backbone`` on an ``image_size`` input, from a meta forward pass (no compute)."""
    try:
        with torch.device("meta"), torch.no_grad():
            out = backbone(torch.empty(1, 3, image_size, image_size))
    except Exception as e:  # noqa: BLE001 - a wrong image size fails deep inside the network
        raise ModelError(
            f"{path}: {architecture} does not accept {image_size} px input: {type(e).__name__}: {one_line(e)}"
        ) from None
    if out.ndim != 2:
        raise ModelError(f"{path}: {architecture} gives {tuple(out.shape)} outputs, not (N, embed_dim)")
    return int(out.shape[1])


def open_clip_model(architecture: str) -> nn.Module:
    import open_clip

    # hf-hub: and local-dir: names make open_clip fetch a config (and weights); only built-in configs are allowed.
    if architecture not in open_clip.list_models():
        raise ModelError(
            f"unknown open_clip architecture {architecture!r}; use a built-in config name such as ViT-B-16 "
            "(for a hub model, read model_cfg from its open_clip_config.json)"
        )
    model = open_clip.create_model(architecture, pretrained=None, device=torch.get_default_device())
    if not isinstance(model, open_clip.CLIP | open_clip.CustomTextCLIP):
        raise ModelError(f"open_clip architecture {architecture!r} is a {type(model).__name__}, not a CLIP model")
    return model


def open_clip_expected(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict keys a checkpoint must have: the full model's, or only ``visual.*`` for a saved tower."""
    expected = model.state_dict()
    if all(k.startswith("visual.") for k in state):
        return {k: v for k, v in expected.items() if k.startswith("visual.")}
    return expected


def open_clip_tower(architecture: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    check_keys(
        open_clip_expected(build_meta(lambda: open_clip_model(architecture), path), state), state, path, architecture
    )
    visual_state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    visual = materialise(lambda: open_clip_model(architecture).visual, visual_state, path, f"{architecture} visual")
    return OpenClipImageTower(visual)


def timm_model(architecture: str) -> nn.Module:
    import timm

    if ":" in architecture:  # hf-hub:, timm/ pretrained tags would reach the network
        raise ModelError(f"timm architecture {architecture!r} names a hub model; use a plain timm model name")
    if not timm.is_model(architecture):
        raise ModelError(f"unknown timm architecture {architecture!r}")
    return timm.create_model(architecture, pretrained=False, num_classes=0)


def drop_timm_classifier(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the classifier tensors of a full timm checkpoint: the backbone is built with ``num_classes=0``."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    expected = model.state_dict()
    return {
        k: v for k, v in state.items() if k in expected or not any(k == p or k.startswith(f"{p}.") for p in prefixes)
    }


def timm_backbone(architecture: str, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    model = build_meta(lambda: timm_model(architecture), path)
    return materialise(lambda: timm_model(architecture), drop_timm_classifier(model, state), path, architecture)


def copy_with_sha256(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` (atomically) and return its sha256; hashing runs beside the kernel copy."""
    tmp = target.with_name(f".{target.name}.tmp")
    with ThreadPoolExecutor(1) as pool:
        digest = pool.submit(file_sha256, source)  # hashlib releases the GIL: ~free next to the copy
        try:
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ModelError(f"{source}: cannot copy to {target}: {one_line(e)}") from None
        return digest.result()


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()

