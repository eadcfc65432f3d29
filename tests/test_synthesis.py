import numpy as np
import pytest

from lib.synth import pairs
from lib.synth.masks import draw_masks
from lib.synth.shapes import ShapeModel
from tests.helpers import make_discs


@pytest.fixture(scope="module")
def discs():
    return make_discs(60, 32, seed=0)


def test_mask_sources_give_new_or_deformed_masks(discs):
    _, masks = discs
    shapes = ShapeModel.fit(masks, 2)
    new = draw_masks("new", 20, seed=0, shape_model=shapes)
    deformed = draw_masks("deformed", 20, seed=0, train_masks=masks)
    for drawn in (new, deformed):
        assert drawn.shape == (20, 32, 32) and drawn.dtype == np.uint8 and set(np.unique(drawn)) <= {0, 1}
    assert np.array_equal(new, draw_masks("new", 20, seed=0, shape_model=shapes))
    with pytest.raises(ValueError, match="unknown mask source 'drawn'"):
        draw_masks("drawn", 2, seed=0)
    with pytest.raises(ValueError, match="needs a fitted shape model"):
        draw_masks("new", 2, seed=0)


def test_filter_keeps_pairs_the_segmenter_agrees_with(discs):
    images, masks = discs
    wrong = np.roll(masks, 12, axis=2)  # the mask no longer matches its image
    pairs_masks = np.concatenate([masks[:10], wrong[:10]])
    pairs_images = np.concatenate([images[:10], images[:10]])
    segmenter = lambda x: (x[:, 0] > 1.5).astype(np.uint8)  # noqa: E731 (bright discs)
    result = pairs.filter_pairs(pairs_images, pairs_masks, segmenter, threshold=0.5)
    has_fg = pairs_masks.reshape(20, -1).any(1)
    assert result.kept[:10].all() and not result.kept[10:][has_fg[10:]].any()
    assert len(result.images) == len(result.masks) == int(result.kept.sum()) and "kept" in result.summary
    assert pairs.filter_pairs(pairs_images, pairs_masks, segmenter, threshold=0).kept.all()
    with pytest.raises(ValueError, match=f"keeps none of {int(has_fg.sum())}"):  # empty pairs would score 1
        pairs.filter_pairs(pairs_images[has_fg], pairs_masks[has_fg], lambda x: np.zeros_like(x[:, 0], np.uint8), 1.0)
    with pytest.raises(ValueError, match="must lie in"):
        pairs.filter_pairs(pairs_images, pairs_masks, segmenter, 1.5)


def test_make_pairs_draws_masks_generates_their_images_and_filters_them(discs):
    _, masks = discs

    def paint(generator, drawn, seed, device):  # a stand-in generator: the image shows its mask, or not
        return (generator * drawn[:, None].astype(np.float32) * 3.0)

    segmenter = lambda x: (x[:, 0] > 1.5).astype(np.uint8)  # noqa: E731
    every = pairs.make_pairs(paint, 1.0, "deformed", 12, seed=3, train_masks=masks)
    assert every.kept.all() and every.images.shape == (12, 1, 32, 32)
    assert np.array_equal(every.masks, draw_masks("deformed", 12, seed=3, train_masks=masks))
    good = pairs.make_pairs(paint, 1.0, "deformed", 12, seed=3, train_masks=masks, predict_fn=segmenter,
                            threshold=0.5)
    assert good.kept[every.masks.reshape(12, -1).any(1)].all()
    with pytest.raises(ValueError, match="keeps none"):  # blank images never show their masks
        pairs.make_pairs(paint, 0.0, "deformed", 12, seed=3, train_masks=masks[masks.reshape(60, -1).any(1)],
                         predict_fn=segmenter, threshold=0.9)
