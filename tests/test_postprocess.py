"""Tests for lib.seg.postprocess."""

from __future__ import annotations

import numpy as np
import torch

from lib.seg.postprocess import flip_tta, keep_largest_component


def test_keep_largest_component_per_label() -> None:
    mask = np.zeros((12, 12, 12), dtype=np.uint8)
    mask[1:4, 1:4, 1:4] = 1  # label 1, large (27)
    mask[8, 8, 8] = 1  # label 1, small
    mask[6:8, 1:3, 1:3] = 2  # label 2, small (8)
    mask[6:10, 6:10, 1:4] = 2  # label 2, large (48)
    out = keep_largest_component(mask)
    expected = mask.copy()
    expected[8, 8, 8] = 0
    expected[6:8, 1:3, 1:3] = 0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == mask.dtype
    assert mask[8, 8, 8] == 1  # input untouched


def test_keep_largest_component_selected_labels() -> None:
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[0:3, 0:3, 0:3] = 1
    mask[8, 8, 8] = 1
    mask[5:7, 0:2, 0:2] = 2
    mask[0, 8, 8] = 2
    out = keep_largest_component(mask, labels=[1])
    assert out[8, 8, 8] == 0
    assert out[0, 8, 8] == 2  # label 2 not filtered
    assert (out == 2).sum() == 9


def test_keep_largest_component_uses_full_connectivity() -> None:
    mask = np.zeros((6, 6, 6), dtype=np.uint8)
    mask[1, 1, 1] = 1
    mask[2, 2, 2] = 1  # touches only at a corner: one 26-connected component
    mask[2, 2, 3] = 1
    np.testing.assert_array_equal(keep_largest_component(mask), mask)


def test_keep_largest_component_empty() -> None:
    mask = np.zeros((4, 4, 4), dtype=np.int16)
    out = keep_largest_component(mask)
    np.testing.assert_array_equal(out, mask)
    assert out.dtype == mask.dtype
    np.testing.assert_array_equal(keep_largest_component(mask, labels=[1, 2]), mask)


def test_flip_tta_equivariant_model_matches_plain() -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, kernel_size=1)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(conv(x), dim=1)  # pointwise: commutes with flips

    images = torch.randn(2, 2, 8, 6)
    out = flip_tta(predict, images)
    assert out.shape == (2, 3, 8, 6)
    assert not out.requires_grad
    torch.testing.assert_close(out, predict(images).detach())


def test_flip_tta_fixed_prediction_is_unflipped_average() -> None:
    fixed = torch.rand(2, 4, 5, 7)
    before = fixed.clone()
    calls = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return fixed

    images = torch.randn(2, 1, 5, 7)
    out = flip_tta(predict, images)
    expected = (
        fixed + torch.flip(fixed, (3,)) + torch.flip(fixed, (2,)) + torch.flip(fixed, (2, 3))
    ) / 4
    assert out.shape == (2, 4, 5, 7)
    assert len(calls) == 4
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fixed, before)  # prediction not modified in place


def test_flip_tta_position_dependent_model() -> None:
    ramp = torch.linspace(0, 1, 6).view(1, 1, 1, 6)

    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x + ramp)

    images = torch.randn(1, 1, 4, 6)
    out = flip_tta(predict, images, dims=((3,),))
    expected = (predict(images) + torch.flip(predict(torch.flip(images, (3,))), (3,))) / 2
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(flip_tta(predict, images, dims=()), predict(images))


def test_flip_tta_exchanges_mirror_pairs_in_single_flips_only() -> None:
    probs = torch.tensor([0.2, 0.5, 0.3]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = flip_tta(lambda x: probs[: len(x)], torch.zeros(2, 1, 4, 4), swap=[(1, 2)])
    # identity and the double flip keep (0.5, 0.3); the two single flips give (0.3, 0.5)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.2, 0.4, 0.4]))
