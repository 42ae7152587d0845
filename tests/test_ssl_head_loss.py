"""Pre-training head and multi-clusterer loss: shapes, names, reference values, learning, edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_logonet.ssl.head import SlicePseudoLabelHead
from nnunet_logonet.ssl.loss import multi_cluster_nll, pseudo_label_accuracy

KS = (3, 7, 5)


def random_batch(ks=KS, batch=2, n_slices=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, n_slices, sum(ks), generator=g, requires_grad=True)
    targets = torch.stack([torch.randint(k, (batch, n_slices), generator=g) for k in ks], -1)
    slice_mask = torch.rand(batch, n_slices, generator=g) < 0.5
    return logits, targets, slice_mask


def separable_features(ks, batch=4, channels=16, n_slices=8, seed=0):
    """Each slice's pseudo-labels are written into its features (one-hot, spread over channels), plus noise."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.stack([torch.randint(k, (batch, n_slices), generator=g) for k in ks], -1)
    codes = torch.cat([F.one_hot(targets[..., i], k) for i, k in enumerate(ks)], -1).float()  # (B, S, sum k)
    codes = F.pad(codes, (0, channels - codes.shape[-1]))
    features = codes.permute(0, 2, 1)[..., None, None].expand(-1, -1, -1, 6, 6)
    return features + 0.1 * torch.randn(features.shape, generator=g), targets


@pytest.mark.parametrize("slice_axis, shape, n_slices", [(2, (2, 8, 5, 6, 7), 5), (3, (2, 8, 5, 6, 7), 6),
                                                         (4, (2, 8, 5, 6, 7), 7)])
def test_head_gives_per_slice_logits_for_every_clusterer(slice_axis, shape, n_slices):
    head = SlicePseudoLabelHead(8, KS, slice_axis=slice_axis, grid=2, hidden=16)
    logits = head(torch.randn(shape))
    assert logits.shape == (2, n_slices, sum(KS))
    assert [part.shape[-1] for part in head.split(logits)] == list(KS)
    assert head.offsets == (0, 3, 10, 15)


def test_head_does_not_depend_on_segmentation_classes_and_avoids_seg_layers_names():
    head = SlicePseudoLabelHead(8, KS)
    names = [name for name, _ in head.named_parameters()]
    assert names and not any("seg_layers" in name for name in names)
    logits = head(torch.randn(1, 8, 4, 3, 3))  # a plane smaller than the pooling grid still works
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_head_rejects_wrong_channels_and_bad_arguments():
    head = SlicePseudoLabelHead(8, KS)
    with pytest.raises(ValueError, match=r"\(B, 8, D, H, W\)"):
        head(torch.randn(1, 4, 4, 4, 4))
    for kwargs, name in (({"in_channels": 0, "ks": KS}, "in_channels"), ({"in_channels": 8, "ks": ()}, "ks"),
                         ({"in_channels": 8, "ks": (3, 0)}, "ks"), ({"in_channels": 8, "ks": 5}, "ks"),
                         ({"in_channels": 8, "ks": KS, "grid": 0}, "grid"),
                         ({"in_channels": 8, "ks": KS, "slice_axis": 1}, "slice_axis")):
        with pytest.raises(ValueError, match=name):
            SlicePseudoLabelHead(**kwargs)
    with pytest.raises(ValueError, match="features must be floating point, got torch.int64"):
        head(torch.zeros(1, 8, 4, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_loss_equals_per_clusterer_tempered_cross_entropy(tau):
    logits, targets, slice_mask = random_batch()
    selected, labels = logits[slice_mask], targets[slice_mask]
    per_clusterer = [F.cross_entropy(part / tau, labels[:, i], reduction="none")
                     for i, part in enumerate(torch.split(selected, KS, -1))]
    reference = torch.stack(per_clusterer, -1)  # (n_masked, N)
    mean = multi_cluster_nll(logits, targets, KS, slice_mask, tau=tau)
    total = multi_cluster_nll(logits, targets, KS, slice_mask, tau=tau, reduction="sum")
    torch.testing.assert_close(mean, reference.mean())
    torch.testing.assert_close(total, reference.sum())


def test_unmasked_slices_do_not_contribute():
    logits, targets, slice_mask = random_batch()
    before = multi_cluster_nll(logits, targets, KS, slice_mask)
    changed = logits.detach().clone()
    changed[~slice_mask] = 100 * torch.randn_like(changed[~slice_mask])
    torch.testing.assert_close(multi_cluster_nll(changed, targets, KS, slice_mask), before.detach())


def test_no_masked_slice_gives_zero_finite_loss_with_gradient():
    logits, targets, slice_mask = random_batch()
    loss = multi_cluster_nll(logits, targets, KS, torch.zeros_like(slice_mask))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    assert math.isnan(pseudo_label_accuracy(logits, targets, KS, torch.zeros_like(slice_mask)).item())


def test_loss_decreases_and_accuracy_rises_above_chance_when_training_the_head():
    ks = (4, 6, 5)
    torch.manual_seed(0)
    features, targets = separable_features(ks)
    head = SlicePseudoLabelHead(16, ks, grid=2, hidden=32)
    slice_mask = torch.ones(targets.shape[:2], dtype=torch.bool)
    slice_mask[:, ::3] = False
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = multi_cluster_nll(head(features), targets, ks, slice_mask, tau=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    accuracy = pseudo_label_accuracy(head(features), targets, ks, slice_mask).item()
    chance = sum(1 / k for k in ks) / len(ks)
    assert 0.0 <= accuracy <= 1.0 and accuracy > 0.9 > chance


def test_accuracy_counts_top1_over_masked_slices_and_clusterers():
    logits, targets, slice_mask = random_batch()
    perfect = torch.cat([F.one_hot(targets[..., i], k) for i, k in enumerate(KS)], -1).float()
    assert pseudo_label_accuracy(perfect, targets, KS, slice_mask).item() == 1.0
    wrong = perfect.clone()
    wrong[..., :3] = F.one_hot((targets[..., 0] + 1) % 3, 3).float()  # clusterer 0 always wrong
    assert pseudo_label_accuracy(wrong, targets, KS, slice_mask).item() == pytest.approx(2 / 3)


def test_loss_default_temperature_is_the_papers():
    import inspect

    assert inspect.signature(multi_cluster_nll).parameters["tau"].default == 0.1


def test_loss_rejects_bad_input():
    logits, targets, slice_mask = random_batch()
    with pytest.raises(ValueError, match="tau"):
        multi_cluster_nll(logits, targets, KS, slice_mask, tau=0)
    with pytest.raises(ValueError, match="tau must be a finite number > 0.0, got inf"):  # was a silent NaN loss
        multi_cluster_nll(logits, targets, KS, slice_mask, tau=float("inf"))
    with pytest.raises(ValueError, match="targets must be integer cluster indices"):  # were truncated by .long()
        multi_cluster_nll(logits, targets.float() + 0.7, KS, slice_mask)
    with pytest.raises(ValueError, match=r"ks \(clusters per clusterer\) must be a non-empty list of ints >= 1"):
        multi_cluster_nll(logits, targets, (0, 10, 5), slice_mask)
    with pytest.raises(ValueError, match="reduction"):
        multi_cluster_nll(logits, targets, KS, slice_mask, reduction="max")
    with pytest.raises(ValueError, match="logits"):
        multi_cluster_nll(logits[..., :-1], targets, KS, slice_mask)
    with pytest.raises(ValueError, match="targets"):
        multi_cluster_nll(logits, targets[..., :2], KS, slice_mask)
    with pytest.raises(ValueError, match="slice_mask"):
        multi_cluster_nll(logits, targets, KS, slice_mask.float())
    out_of_range = targets.clone()
    b, s = slice_mask.nonzero()[0].tolist()
    out_of_range[b, s, 0] = 3  # k of clusterer 0 is 3
    with pytest.raises(ValueError, match="range"):
        multi_cluster_nll(logits, out_of_range, KS, slice_mask)


def test_head_averages_each_cell_of_a_slice():
    """Each slice is average-pooled to grid x grid cells: two feature maps with the same cell means (one
    constant, one a checkerboard around it) give the same logits."""
    torch.manual_seed(0)
    head = SlicePseudoLabelHead(4, KS, grid=2, hidden=16).eval()
    constant = torch.randn(1, 4, 3, 1, 1).expand(1, 4, 3, 8, 8).contiguous()
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0  # +-1, mean 0 per 4x4 cell
    with torch.no_grad():
        assert torch.allclose(head(constant), head(constant + 0.5 * checker), atol=1e-5)


def test_head_is_layer_norm_mlp_with_gelu_on_the_cell_means():
    """The head's formula written out: cell means of each slice (channel-major), LayerNorm, Linear, GELU,
    Linear. Max pooling or a dropped GELU (a linear head) give other logits."""
    torch.manual_seed(0)
    head = SlicePseudoLabelHead(3, KS, grid=2, hidden=8).eval()
    for p in head.parameters():  # away from the near-zero init, where GELU is almost linear
        torch.nn.init.normal_(p)
    features = torch.randn(2, 3, 5, 6, 4)  # (B, C, D, H, W), slices along D, cells of 3 x 2 voxels
    cells = features.reshape(2, 3, 5, 2, 3, 2, 2).mean((4, 6))  # (B, C, D, 2, 2)
    pooled = cells.permute(0, 2, 1, 3, 4).reshape(2, 5, 3 * 4)
    hidden = F.gelu(F.linear(F.layer_norm(pooled, (12,), head.norm.weight, head.norm.bias), head.fc1.weight,
                             head.fc1.bias))
    expected = F.linear(hidden, head.fc2.weight, head.fc2.bias)
    with torch.no_grad():
        assert torch.allclose(head(features), expected, atol=1e-5)
