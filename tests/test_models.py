"""Model directories: save/load round trips, checkpoint import for open_clip and timm, and safe refusal of pickles."""

import json

import numpy
import pytest
import torch

from pzscale.errors import ModelError
from pzscale.ml import models, weights

torch.set_num_threads(2)


def _builtin_card(**changes):
    fields = dict(
        name="PZ CNN small",
        version="0.1",
        kind="builtin",
        architecture="pzcnn-small",
        embed_dim=32,
        image_size=64,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        classes=["Eukaryota>Copepoda", "Eukaryota>Diatoms", "detritus"],
        head="mlp",
    )
    return models.ModelCard(**{**fields, **changes})


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    torch.manual_seed(0)
    backbone = models.builtin_backbone(32)
    head = models.make_head("mlp", 32, 3)
    # A few training-mode steps so batch-norm running statistics differ from their defaults.
    backbone.train()
    with torch.no_grad():
        for _ in range(2):
            backbone(torch.rand(4, 3, 64, 64))
    out = tmp_path_factory.mktemp("builtin")
    models.save_model(out, _builtin_card(), backbone, head)
    backbone.eval()
    head.eval()
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = backbone(x), head(backbone(x))
    return out, x, expected


def test_builtin_roundtrip_gives_identical_outputs(builtin_dir):
    model_dir, x, (embeddings, logits) = builtin_dir
    loaded = models.load_model(model_dir)
    assert not loaded.backbone.training and not loaded.head.training
    assert torch.equal(loaded.embed(x), embeddings)
    assert torch.equal(loaded.logits(x), logits)
    assert loaded.embed(x).shape == (5, 32) and loaded.logits(x).shape == (5, 3)
    card = loaded.card
    assert card.weights == {"backbone": "backbone.safetensors", "head": "head.safetensors"}
    assert card.created and card.pzscale and card.mean == (0.5, 0.5, 0.5)
    assert set(card.extra["weights_sha256"]) == {"backbone", "head"}
    assert card == models.ModelCard.load(model_dir)
    assert card.id == "pz-cnn-small-0.1"


def test_embed_restores_eval_mode(builtin_dir):
    model_dir, x, (embeddings, _) = builtin_dir
    loaded = models.load_model(model_dir)
    loaded.backbone.train()
    assert torch.equal(loaded.embed(x), embeddings)


def test_builtin_backbone_accepts_any_size_from_32():
    net = models.builtin_backbone(16).eval()
    with torch.no_grad():
        for size in (32, 50, 128):
            assert net(torch.rand(2, 3, size, size)).shape == (2, 16)


def test_make_head_kinds():
    assert isinstance(models.make_head("linear", 8, 4), torch.nn.Linear)
    mlp = models.make_head("mlp", 8, 4)
    assert mlp(torch.rand(3, 8)).shape == (3, 4)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in mlp.modules())
    with pytest.raises(ModelError, match="unknown head kind"):
        models.make_head("transformer", 8, 4)


def test_card_id_is_safe_for_zarr_names():
    card = _builtin_card(name="CLIP ViT-B/16 (Planktonzilla)", version="v1.0+local")
    assert card.id == "clip-vit-b-16-planktonzilla-v1.0-local"


def test_card_json_layout(builtin_dir):
    text = (builtin_dir[0] / "model_card.json").read_text()
    assert text.startswith('{\n "name": "PZ CNN small"')  # indent=1
    assert json.loads(text)["classes"][2] == "detritus"


def test_logits_without_head_is_an_error(tmp_path):
    card = _builtin_card(head=None, classes=[])
    models.save_model(tmp_path, card, models.builtin_backbone(32))
    loaded = models.load_model(tmp_path)
    assert loaded.head is None and "head" not in loaded.card.weights
    with pytest.raises(ModelError, match="no class head"):
        loaded.logits(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------- open_clip and timm


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A random ViT-B-16 saved both ways open_clip users have them, its tower, an input and its embedding."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.encode_image(x)
    out = tmp_path_factory.mktemp("clip")
    state = model.state_dict()
    files = {"state_dict": out / "open_clip_pytorch_model.bin", "training_checkpoint": out / "epoch_1.pt"}
    torch.save(state, files["state_dict"])
    # As open_clip's trainer saves under DistributedDataParallel.
    torch.save(
        {"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}},
        files["training_checkpoint"],
    )
    return files, models.OpenClipImageTower(model.visual), x, expected


@pytest.mark.parametrize("layout", ["state_dict", "training_checkpoint"])
def test_open_clip_checkpoint_import_and_load(clip_files, tmp_path, layout):
    files, _, x, expected = clip_files
    card = models.import_checkpoint(
        files[layout], kind="open_clip", architecture="ViT-B-16", out_dir=tmp_path, name="clip", version="1"
    )
    suffix = files[layout].suffix
    assert card.embed_dim == 512 and card.image_size == 224 and card.mean == models.OPENAI_MEAN
    assert card.weights == {"backbone": f"backbone{suffix}"} and (tmp_path / f"backbone{suffix}").is_file()
    assert len(card.extra["weights_sha256"]["backbone"]) == 64
    loaded = models.load_model(tmp_path)
    assert isinstance(loaded.backbone, models.OpenClipImageTower)
    assert not any(p.is_meta for p in loaded.backbone.parameters())
    torch.testing.assert_close(loaded.embed(x), expected, atol=1e-5, rtol=0)


def test_open_clip_saved_tower_reloads(clip_files, tmp_path):
    """A tower saved with save_model (e.g. fine-tuned, with a head) loads through the same path."""
    _, tower, x, expected = clip_files
    card = models.ModelCard(
        name="clip",
        version="2",
        kind="open_clip",
        architecture="ViT-B-16",
        embed_dim=512,
        image_size=224,
        mean=models.OPENAI_MEAN,
        std=models.OPENAI_STD,
        classes=["a", "b"],
        head="linear",
    )
    models.save_model(tmp_path, card, tower, models.make_head("linear", 512, 2))
    loaded = models.load_model(tmp_path)
    assert loaded.card.weights["backbone"] == "backbone.safetensors"
    torch.testing.assert_close(loaded.embed(x), expected, atol=1e-5, rtol=0)
    assert loaded.logits(x).shape == (1, 2)


def test_open_clip_wrong_architecture_names_the_file(clip_files, tmp_path):
    path = clip_files[0]["state_dict"]
    with pytest.raises(ModelError, match=r"open_clip_pytorch_model\.bin: weights do not fit ViT-B-32: .*mis-shaped"):
        models.import_checkpoint(
            path, kind="open_clip", architecture="ViT-B-32", out_dir=tmp_path, name="c", version="1"
        )
    with pytest.raises(ModelError, match="unknown open_clip architecture"):
        models.import_checkpoint(
            path, kind="open_clip", architecture="hf-hub:org/model", out_dir=tmp_path, name="c", version="1"
        )
    assert not list(tmp_path.iterdir())


def test_timm_safetensors_import_and_load(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()  # with its 1000-class head
    path = tmp_path / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    card = models.import_checkpoint(
        path,
        kind="timm",
        architecture="vit_small_patch16_224",
        out_dir=tmp_path / "m",
        name="vit",
        version="1",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    assert card.embed_dim == 384 and card.weights == {"backbone": "backbone.safetensors"}
    loaded = models.load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.embed(x), expected, atol=1e-5, rtol=0)
    card.embed_dim = 512  # a hand-edited card that disagrees with the weights
    card.save(tmp_path / "m")
    with pytest.raises(ModelError, match="embed_dim is 512 but vit_small_patch16_224 gives 384"):
        models.load_model(tmp_path / "m")


# ---------------------------------------------------------------- refusals and corrupt files


class _RunsCode:
    """A pickle payload: unpickling it would call open(marker, "w") and create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _CustomWeights:
    def __init__(self):
        self.weight = torch.ones(3)


def _card_with_weights(model_dir, file_name, kind="builtin", architecture="pzcnn-small"):
    card = _builtin_card(kind=kind, architecture=architecture, head=None, classes=[], weights={"backbone": file_name})
    card.save(model_dir)


@pytest.mark.parametrize("payload", ["reduce", "custom_class"])
def test_pickle_needing_code_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "payload_ran"
    obj = _RunsCode(marker) if payload == "reduce" else _CustomWeights()
    path = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "state_dict": {"w": torch.ones(1)}, "extra": obj}, path)
    with pytest.raises(ModelError, match=r"evil\.pt: refused: the checkpoint needs arbitrary code") as info:
        models.import_checkpoint(
            path, kind="timm", architecture="vit_small_patch16_224", out_dir=tmp_path / "m", name="x", version="1"
        )
    assert "\n" not in str(info.value)
    model_dir = tmp_path / "dir"
    _card_with_weights(model_dir, "backbone.pt")
    (model_dir / "backbone.pt").write_bytes(path.read_bytes())
    with pytest.raises(ModelError, match=r"backbone\.pt: refused"):
        models.load_model(model_dir)
    assert not marker.exists()


def test_legacy_pickle_with_payload_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "payload_ran"
    path = tmp_path / "old.pth"
    path.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(ModelError, match=r"old\.pth"):
        models.read_state_dict(path)
    assert not marker.exists()


def test_missing_directory_and_card(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        models.load_model(tmp_path / "nowhere")
    with pytest.raises(ModelError, match=r"model_card\.json: no model card"):
        models.load_model(tmp_path)
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable model card"):
        models.load_model(tmp_path)
    (tmp_path / "model_card.json").write_text('{"name": "x"}')
    with pytest.raises(ModelError, match="missing fields"):
        models.load_model(tmp_path)


def test_missing_truncated_and_mismatched_weights(builtin_dir, tmp_path):
    model_dir = tmp_path / "m"
    _card_with_weights(model_dir, "backbone.safetensors")
    with pytest.raises(ModelError, match=r"backbone\.safetensors: weight file not found"):
        models.load_model(model_dir)
    data = (builtin_dir[0] / "backbone.safetensors").read_bytes()
    (model_dir / "backbone.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"backbone\.safetensors: corrupt or unreadable safetensors"):
        models.load_model(model_dir)
    # The right file for a different width: strict loading must say which tensors do not fit.
    (model_dir / "backbone.safetensors").write_bytes(data)
    card = models.ModelCard.load(model_dir)
    card.embed_dim = 64
    card.save(model_dir)
    with pytest.raises(ModelError, match=r"backbone\.safetensors: weights do not fit pzcnn-small: .*mis-shaped"):
        models.load_model(model_dir)


def test_meta_build_falls_back_when_tensors_live_outside_the_state_dict(tmp_path):
    """A network with a non-persistent buffer cannot be loaded onto a meta build; it is rebuilt for real."""

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)
            self.register_buffer("mask", torch.tensor([1.0, 0.0, 1.0]), persistent=False)

        def forward(self, x):
            return self.linear(x * self.mask)

    torch.manual_seed(0)
    reference = Masked()
    state = {k: v.half() for k, v in reference.state_dict().items()}  # a half-precision file stays float32 here
    built = weights.materialise(Masked, state, tmp_path / "w.safetensors", "masked")
    assert not list(weights.meta_tensors(built))
    assert built.linear.weight.dtype == torch.float32 and torch.equal(built.mask, reference.mask)
    x = torch.rand(4, 3)
    torch.testing.assert_close(built(x), reference(x), atol=1e-2, rtol=0)


def test_card_cannot_point_outside_its_directory(tmp_path):
    _card_with_weights(tmp_path, "../elsewhere.safetensors")
    with pytest.raises(ModelError, match="not a plain file name"):
        models.load_model(tmp_path)


def test_invalid_card_values():
    with pytest.raises(ModelError, match="kind 'keras'"):
        _builtin_card(kind="keras")
    with pytest.raises(ModelError, match="3 values"):
        _builtin_card(mean=(0.5,))


# ---------------------------------------------------------------- cards validated on load (issue 17)


def _write_card(model_dir, **changes):
    """A valid builtin card's JSON with ``changes`` applied by hand, as an adversarial user would edit it."""
    data = {**_builtin_card().to_dict(), "weights": {"backbone": "backbone.safetensors", "head": "head.safetensors"}}
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model_card.json").write_text(json.dumps({**data, **changes}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("weights", ["backbone.safetensors"]),
        ("weights", {"backbone": 5}),  # backbone as a number
        ("classes", "abc"),  # a string of the right length (3 classes)
        ("classes", ["a", "b", "a"]),
        ("classes", ["a", 7, "c"]),
        ("mean", "abc"),
        ("mean", [0.5, "x", 0.5]),
        ("mean", [0.5, 0.5]),
        ("std", [0.25, float("nan"), 0.25]),
        ("std", [0.25, 0, 0.25]),
        ("std", [0.25, float("inf"), 0.25]),
        ("embed_dim", "32"),
        ("embed_dim", 0),
        ("embed_dim", 32.5),
        ("image_size", True),
        ("name", 3),
        ("version", None),
        ("head", "tree"),
        ("extra", []),
    ],
)
def test_bad_card_field_is_one_line_naming_file_and_field(tmp_path, field, value):
    _write_card(tmp_path, **{field: value})  # json.dumps writes NaN / Infinity, which json.loads reads back
    for load in (models.ModelCard.load, models.load_model):
        with pytest.raises(ModelError) as info:
            load(tmp_path)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / 'model_card.json'}: field {field!r} ")
        assert "\n" not in message and len(message) < 400


def test_card_error_message_wording(tmp_path):
    _write_card(tmp_path, mean="abc", classes=["a", "a", "b"])
    with pytest.raises(ModelError) as info:
        models.ModelCard.load(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'model_card.json'}: field 'mean' must be 3 values (R, G, B), finite numbers, but the card has "
        "mean 'abc'; field 'classes' must name each class once ('a' repeated), but the card has classes ['a', 'a', 'b']"
    )


def test_card_constructor_validates_types_too():
    with pytest.raises(ModelError, match=r"field 'embed_dim' must be a whole number > 0"):
        _builtin_card(embed_dim="32")
    with pytest.raises(ModelError, match=r"field 'std' .*> 0"):
        _builtin_card(std=(0.25, float("nan"), 0.25))
    with pytest.raises(ModelError, match=r"field 'classes' must be a list of non-empty strings"):
        _builtin_card(classes="abc")
    card = _builtin_card(mean=[1, 0, 0.5], embed_dim=numpy.int64(32))  # ints and numpy ints are fine
    assert card.mean == (1.0, 0.0, 0.5) and type(card.embed_dim) is int


def test_head_size_must_match_classes(builtin_dir, tmp_path):
    for name in ("backbone.safetensors", "head.safetensors"):
        (tmp_path / name).write_bytes((builtin_dir[0] / name).read_bytes())
    _write_card(tmp_path, classes=["a", "b"])  # the head gives 3 outputs
    with pytest.raises(ModelError) as info:
        models.load_model(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'model_card.json'}: field 'classes' has 2 entries but head.safetensors gives 3 outputs"
    )
    _write_card(tmp_path, classes=["a", "b", "c", "d"])
    with pytest.raises(ModelError, match=r"model_card\.json: field 'classes' has 4 entries but .* gives 3 outputs"):
        models.load_model(tmp_path)
    _write_card(tmp_path, head="linear")  # a linear head's weights where the card says mlp and vice versa
    with pytest.raises(ModelError, match=r"head\.safetensors: weights do not fit linear head"):
        models.load_model(tmp_path)


def test_embed_dim_must_match_the_weights(builtin_dir, tmp_path):
    (tmp_path / "backbone.safetensors").write_bytes((builtin_dir[0] / "backbone.safetensors").read_bytes())
    _write_card(tmp_path, embed_dim=48, head=None, classes=[], weights={"backbone": "backbone.safetensors"})
    with pytest.raises(ModelError) as info:
        models.load_model(tmp_path)
    message = str(info.value)
    assert "model_card.json is 48 but the weights give 32" in message and "field 'embed_dim'" in message
    # A head trained on another width: the backbone fits, the head does not.
    models.save_model(tmp_path / "h", _builtin_card(), models.builtin_backbone(32), models.make_head("mlp", 32, 3))
    from safetensors.torch import save_file

    save_file(models.make_head("mlp", 16, 3).state_dict(), str(tmp_path / "h" / "head.safetensors"))
    with pytest.raises(ModelError, match=r"model_card\.json: field 'embed_dim' is 32 but head\.safetensors takes 16"):
        models.load_model(tmp_path / "h")


class _BlockedPayload:
    """A pickle payload from a module torch blocks outright (os): its refusal text is torch's longest advice."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("payload", ["blocked", "reduce", "custom_class"])
def test_pickle_refusal_gives_no_unsafe_advice(tmp_path, payload):
    marker = tmp_path / "payload_ran"
    obj = {"blocked": _BlockedPayload, "reduce": _RunsCode}.get(payload, lambda _: _CustomWeights())(marker)
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": obj}, path)
    with pytest.raises(ModelError) as info:
        models.read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused: the checkpoint needs arbitrary code to unpickle (it imports ")
    assert "\n" not in message and len(message) < 300
    for advice in ("weights_only=False", "`False`", "safe_globals", "trust"):
        assert advice not in message
    assert not marker.exists()
