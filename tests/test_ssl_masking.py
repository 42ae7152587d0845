"""Masked slice sequences: statistics of phi1, M and phi2, chain structure, patch grid, axes, validation."""

import inspect

import pytest
import torch

from nnunet_logonet.ssl.masking import SliceSequenceMasker, apply_mask, sample_slice_mask


def draws(masker, shape, n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [masker.sample(shape, generator=generator) for _ in range(n)]


def chains_from_anchors(anchors, chain_length):
    """Reference: every anchor masks itself and its M - 1 predecessors, clipped at slice 0."""
    expected = torch.zeros_like(anchors)
    for b, a in anchors.nonzero().tolist():
        expected[b, max(0, a - chain_length + 1): a + 1] = True
    return expected


def test_anchor_rate_matches_phi1():
    masks = draws(SliceSequenceMasker(phi1=0.1), (64, 1, 64, 4, 4), n=20)
    rate = torch.stack([m.anchors for m in masks]).float().mean().item()
    assert rate == pytest.approx(0.1, abs=0.01)


@pytest.mark.parametrize("chain_length", [1, 3, 5, 7])
def test_masked_slices_are_exactly_the_chains(chain_length):
    for mask in draws(SliceSequenceMasker(phi1=0.1, chain_length=chain_length), (8, 1, 40, 4, 4), n=5):
        assert torch.equal(mask.slices, chains_from_anchors(mask.anchors, chain_length))


@pytest.mark.parametrize("phi1, chain_length", [(0.1, 5), (0.2, 3), (0.05, 7)])
def test_masked_slice_rate_matches_chain_length(phi1, chain_length):
    # away from the end of the patch a slice is masked iff one of the next M anchors fires
    masks = draws(SliceSequenceMasker(phi1=phi1, chain_length=chain_length), (64, 1, 64, 2, 2), n=20)
    interior = torch.stack([m.slices for m in masks])[..., : 64 - chain_length + 1]
    assert interior.float().mean().item() == pytest.approx(1 - (1 - phi1) ** chain_length, abs=0.015)


@pytest.mark.parametrize("patch_sizes", [(1,), (4,), (16,), ("full",), (1, 2, 4, 8, 16, 32, "full")])
def test_zeroed_fraction_within_masked_slices_matches_phi2(patch_sizes):
    masker = SliceSequenceMasker(phi1=0.3, chain_length=3, patch_sizes=patch_sizes, phi2=0.7)
    masks = draws(masker, (32, 1, 32, 16, 16), n=8)
    voxels = torch.stack([m.voxels[:, 0] for m in masks])  # (n, B, D, H, W)
    slices = torch.stack([m.slices for m in masks])
    assert not voxels[~slices].any(), "a slice outside every chain was zeroed"
    assert voxels[slices].float().mean().item() == pytest.approx(0.7, abs=0.03)


@pytest.mark.parametrize("size, height, width", [(4, 16, 16), (4, 10, 13), (3, 7, 5), (16, 10, 10), ("full", 9, 6),
                                               (8, 16, 6)])  # narrower than P, taller: the edges clip apart
def test_zeroing_follows_the_patch_grid(size, height, width):
    masker = SliceSequenceMasker(phi1=0.5, chain_length=2, patch_sizes=(size,), phi2=0.5)
    mask = draws(masker, (4, 1, 16, height, width), n=1)[0]
    edge_h = height if size == "full" else min(size, height)
    edge_w = width if size == "full" else min(size, width)
    planes = mask.voxels[:, 0][mask.slices]  # (n_masked, H, W)
    assert planes.shape[0] > 0
    for top in range(0, height, edge_h):
        for left in range(0, width, edge_w):
            block = planes[:, top: top + edge_h, left: left + edge_w].flatten(1)
            # every (cropped) patch is zeroed entirely or not at all
            assert torch.equal(block.all(1), block.any(1))


def test_patch_larger_than_slice_zeroes_whole_slices():
    masker = SliceSequenceMasker(phi1=0.3, patch_sizes=(64,), phi2=0.5)
    mask = draws(masker, (8, 1, 32, 12, 20), n=1)[0]
    planes = mask.voxels[:, 0][mask.slices].flatten(1)
    assert torch.equal(planes.all(1), planes.any(1))
    assert 0 < planes.all(1).float().mean() < 1


@pytest.mark.parametrize("slice_axis", [2, 3, 4, -1])
def test_slice_axis_selects_the_plane(slice_axis):
    shape = (3, 2, 10, 12, 14)
    mask = sample_slice_mask(shape, phi1=0.3, patch_sizes=("full",), phi2=1.0, slice_axis=slice_axis,
                             generator=torch.Generator().manual_seed(1))
    axis = slice_axis % 5
    assert mask.voxels.shape == (3, 1, 10, 12, 14)
    assert mask.slices.shape == (3, shape[axis])
    # phi2 = 1 with whole-slice patches: exactly the chain slices are zeroed, along slice_axis
    zeroed_slices = torch.movedim(mask.voxels[:, 0], axis - 1, 1).flatten(2).all(-1)
    assert torch.equal(zeroed_slices, mask.slices)


def test_apply_mask_zeroes_every_channel_and_keeps_the_input():
    x = torch.rand(2, 3, 8, 6, 6) + 1
    masked, mask = SliceSequenceMasker(phi1=0.5)(x, generator=torch.Generator().manual_seed(0))
    assert mask.voxels.any()
    assert torch.equal(masked == 0, mask.voxels.expand_as(x))
    assert (x > 0).all(), "the input was modified in place"
    assert torch.equal(apply_mask(x, mask.voxels), masked)
    with pytest.raises(ValueError, match="must be a bool tensor, got dtype torch.float32"):
        apply_mask(x, mask.voxels.float())


def test_same_generator_seed_gives_the_same_mask():
    a, b = (draws(SliceSequenceMasker(), (2, 1, 32, 16, 16), n=1, seed=7)[0] for _ in range(2))
    c = draws(SliceSequenceMasker(), (2, 1, 32, 16, 16), n=1, seed=8)[0]
    assert torch.equal(a.voxels, b.voxels) and torch.equal(a.slices, b.slices)
    assert not torch.equal(a.voxels, c.voxels)


@pytest.mark.parametrize("phi1, expected", [(0.0, False), (1.0, True)])
def test_extreme_anchor_rates(phi1, expected):
    mask = sample_slice_mask((2, 1, 16, 4, 4), phi1=phi1)
    assert bool(mask.slices.all()) is expected and bool(mask.slices.any()) is expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"phi1": 1.5}, {"phi1": -0.1}, {"phi2": 2}, {"phi1": "0.1"}, {"chain_length": 0}, {"chain_length": 2.5},
        {"patch_sizes": ()}, {"patch_sizes": (0,)}, {"patch_sizes": (4, "half")}, {"patch_sizes": 4},
        {"patch_sizes": (2.0,)}, {"slice_axis": 1}, {"slice_axis": 5}, {"phi1": float("nan")},
        {"patch_sizes": {4, 8}},  # a set has no order, and the seeded draws follow the order
    ],
)
def test_invalid_parameters_are_rejected(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)).split("_")[0]):
        SliceSequenceMasker(**kwargs)


def test_defaults_are_the_papers_masking():
    """phi1 = 0.1 anchors, chains of M = 5 slices, P in {1, 2, 4, ..., 32, full}, phi2 = 0.7."""
    masker = SliceSequenceMasker()
    assert (masker.phi1, masker.chain_length, masker.patch_sizes, masker.phi2) == \
        (0.1, 5, (1, 2, 4, 8, 16, 32, "full"), 0.7)
    # the functional form draws the same masks by default
    shape = (2, 1, 32, 16, 16)
    functional = sample_slice_mask(shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(functional.voxels, masker.sample(shape, generator=torch.Generator().manual_seed(3)).voxels)
    assert {name: p.default for name, p in inspect.signature(sample_slice_mask).parameters.items()
            if name in ("phi1", "chain_length", "patch_sizes", "phi2", "slice_axis")} == \
        {"phi1": 0.1, "chain_length": 5, "patch_sizes": (1, 2, 4, 8, 16, 32, "full"), "phi2": 0.7, "slice_axis": 2}


def test_numpy_scalars_are_taken_as_the_numbers_they_hold():
    """Values read from arrays or plans are often NumPy scalars: 'phi1 must be a probability in [0, 1], got
    np.float32(0.1)' was the message for one."""
    import numpy as np

    masker = SliceSequenceMasker(phi1=np.float32(0.1), chain_length=np.int64(3), patch_sizes=[np.int64(2), "full"],
                                 slice_axis=np.int64(3))
    assert (masker.phi1, masker.chain_length, masker.patch_sizes, masker.slice_axis) == \
        (pytest.approx(0.1), 3, (2, "full"), 3)


def test_invalid_shapes_are_rejected():
    with pytest.raises(ValueError, match="5D"):
        sample_slice_mask((2, 16, 4, 4))
    with pytest.raises(ValueError, match="5D"):
        sample_slice_mask((2, 1, 8.5, 4, 4))
    with pytest.raises(ValueError, match="voxel_mask"):
        apply_mask(torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 3, dtype=torch.bool))
