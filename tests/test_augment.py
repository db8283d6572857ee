"""Augmentation: per-image determinism whatever the batch, recorded parameters, and the dihedral TTA views."""

import json

import pytest
import torch

from pzscale.ml.augment import augment, make_augmentation, seed_for, tta_views

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 48, 48, generator=gen)


@pytest.fixture(scope="module")
def aug():
    # blur_p=0.5 so that some images are blurred and some not in a small batch.
    return make_augmentation(blur_p=0.5)


def test_same_seed_same_output_whatever_the_batch(images, aug):
    a, b, c = images
    sa, sb, sc = seed_for("a", 3), seed_for("b", 3), seed_for("c", 3)
    ab, _ = augment(torch.stack([a, b]), [sa, sb], aug)
    ba, _ = augment(torch.stack([b, a]), [sb, sa], aug)
    alone, _ = augment(a[None], [sa], aug)
    cab, _ = augment(torch.stack([c, a, b]), [sc, sa, sb], aug)
    for other in (ba[1], alone[0], cab[1]):
        assert torch.equal(ab[0], other)
    assert torch.equal(ab[1], ba[0]) and torch.equal(ab[1], cab[2])


def test_different_seeds_or_epochs_differ(images, aug):
    batch = images[:1].expand(4, -1, -1, -1)
    seeds = [seed_for("a", 0), seed_for("a", 1), seed_for("b", 0), seed_for("a", 0, seed=1)]
    assert len(set(seeds)) == 4
    out, _ = augment(batch, seeds, aug)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j])


def test_seed_for_is_stable_across_processes():
    # A constant: hash() would change with PYTHONHASHSEED, a digest does not.
    assert seed_for("ifcb/D20200101T000000_IFCB104_00001", 5) == seed_for("ifcb/D20200101T000000_IFCB104_00001", 5)
    assert 0 <= seed_for("x", 0) < 2**63
    assert seed_for("x", 0) == 7772351801625665652


def test_params_are_recorded_per_image_and_json_serialisable(images, aug):
    seeds = [seed_for(name, 0) for name in "abc"]
    _, params = augment(images, seeds, aug)
    assert len(params) == 3 and [p["seed"] for p in params] == seeds
    json.loads(json.dumps(params))
    affine = params[0]["RandomAffine_2"]
    assert affine["applied"] and -180 <= affine["angle"] <= 180 and 0.9 <= affine["scale"][0] <= 1.1
    assert {"applied"} <= set(params[0]["RandomHorizontalFlip_0"])
    # The same seed records the same parameters alone or in a batch.
    _, alone = augment(images[1:2], seeds[1:2], aug)
    assert alone[0] == params[1]


def test_recorded_flip_matches_the_output(images):
    flip_only = make_augmentation(
        rotation=0.0, scale=(1.0, 1.0), blur_p=0.0, noise_std=0.0, brightness=0.0, contrast=0.0
    )
    seeds = [seed_for(str(i), 0) for i in range(8)]
    batch = images[:1].expand(8, -1, -1, -1)
    out, params = augment(batch, seeds, flip_only)
    for image, p in zip(out, params, strict=True):
        expected = batch[0]
        if p["RandomHorizontalFlip_0"]["applied"]:
            expected = expected.flip(-1)
        if p["RandomVerticalFlip_1"]["applied"]:
            expected = expected.flip(-2)
        assert torch.equal(image, expected)


def test_normalised_batches_are_not_clamped(images, aug):
    normalised = (images - 0.5) / 0.25  # values in [-2, 2], as prepare_batch returns them
    out, _ = augment(normalised, [1, 2, 3], aug)
    assert out.min() < -1.5 and out.max() > 1.5
    # Brightness and contrast only: a gentle change, not a clamp to [0, 1].
    tone = make_augmentation(rotation=0.0, flips=False, scale=(1.0, 1.0), blur_p=0.0, noise_std=0.0)
    toned, params = augment(normalised, [1, 2, 3], tone)
    assert (toned - normalised).abs().max() < 0.5
    factor = params[0]["RandomContrast_1"]["contrast_factor"]
    assert 0.9 <= factor <= 1.1


def test_global_rng_untouched(images, aug):
    state = torch.get_rng_state()
    augment(images, [1, 2, 3], aug)
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_arguments(images, aug):
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        augment(images, [1, 2], aug)
    out, params = augment(images[:0], [], aug)
    assert out.shape == (0, 3, 48, 48) and params == []


def test_tta_views_are_the_eight_dihedral_views():
    image = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)  # no symmetry at all
    views = tta_views(image)
    assert len(views) == 8 and all(v.shape == image.shape for v in views)
    assert torch.equal(views[0], image)
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    # Rotating or mirroring the input permutes its views, so any average over them is exactly invariant.
    for transformed in (torch.rot90(image, 1, dims=(-2, -1)), image.flip(-1), image.flip(-2)):
        others = tta_views(transformed)
        assert sorted(tuple(v.flatten().tolist()) for v in others) == sorted(tuple(v.flatten().tolist()) for v in views)
    # An invariant function (the pixel histogram) averaged over the views equals its value on the input.
    histogram = [torch.sort(v.flatten(1), dim=1).values for v in views]
    assert torch.equal(torch.stack(histogram).mean(0), torch.sort(image.flatten(1), dim=1).values)
