"""Augmentation of lateral (left/right) classes: a mirrored sample exchanges them."""

import torch

from lib.seg.augment import AugmentConfig, augment_batch, lateral_pairs


def test_left_right_label_pairs_are_found_by_name():
    labels = {0: "background", 1: "Brainstem", 3: "RightParotid", 4: "LeftParotid", 6: "kidney_L", 7: "kidney_R",
              8: "left atrium"}
    assert lateral_pairs(labels) == ((4, 3), (6, 7))


def test_mirrored_samples_exchange_the_pair_and_rotated_ones_do_not():
    cfg = AugmentConfig(rotate_deg=0, scale=(1, 1), translate=0, elastic_alpha=0, brightness=0, contrast=(1, 1),
                        gamma=(1, 1), noise_std=0, p=0.5, mirror_swap=((1, 2),))
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    image = (rows * 10 + cols)[None, None].repeat(64, 1, 1, 1)  # tells which flips were applied
    mask = torch.zeros(64, 8, 8, dtype=torch.long)
    mask[:, :4, :4] = 1  # class 1 in one corner, class 3 (no partner) in the opposite one
    mask[:, 4:, 4:] = 3
    out_images, out_masks = augment_batch(image, mask, cfg, torch.Generator().manual_seed(0))
    kinds = set()
    for img, m in zip(out_images, out_masks):
        flip_rows, flip_cols = bool(img[0, 0, 0] >= 40), bool(img[0, 0, 0] % 10 >= 4)
        mirrored = flip_rows != flip_cols
        kinds.add((flip_rows, flip_cols))
        where = (slice(4, None) if flip_rows else slice(None, 4), slice(4, None) if flip_cols else slice(None, 4))
        assert m[where].unique().tolist() == [2 if mirrored else 1], (flip_rows, flip_cols)
        assert (m == 3).sum() == 16  # a class without a partner is never exchanged
    assert len(kinds) == 4  # identity, each single flip and both were drawn
