"""Masks and boxes move with the pixels: crops, flips and the letterboxed evaluation view keep an object's pixels,
its mask and its box on the same place, for square and non-square (squashed) images."""
from __future__ import annotations

import torch

from selfsup.data.dense import IGNORE
from selfsup.views.dense import dense_crop_flip, letterbox, unletterbox_boxes

S = 48


def _object_image(aspect: float, box: tuple[float, float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A squashed record (1, 1, S, S) of an image of width/height ``aspect`` with a bright rectangle at ``box``
    (fractions), and its mask (class 3 on the rectangle)."""
    x = torch.zeros(1, 1, S, S)
    m = torch.zeros(1, 1, S, S, dtype=torch.uint8)
    c0, r0, c1, r1 = (round(v * S) for v in box)
    x[..., r0:r1, c0:c1] = 1.0
    m[..., r0:r1, c0:c1] = 3
    return x, m


def _extent(mask: torch.Tensor, value: int) -> list[int]:
    ys, xs = (mask == value).nonzero().T
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def test_letterbox_keeps_the_whole_image_its_aspect_and_the_box_on_the_object():
    box = (0.25, 0.25, 0.75, 0.5)
    x, m = _object_image(2.0, box)
    v = letterbox(x, m, [torch.tensor([box])], 64, torch.tensor([2.0]))
    # a 2:1 image spans the square's width and half its height, centred: rows 16-48 hold it, the rest is padding
    assert (v.masks[0, :16] == IGNORE).all() and (v.masks[0, 48:] == IGNORE).all()
    assert (v.masks[0, 16:48] != IGNORE).all()
    torch.testing.assert_close(v.boxes[0], torch.tensor([[16.0, 24.0, 48.0, 32.0]]))
    ex = _extent(v.masks[0], 3)
    assert all(abs(a - b) <= 1 for a, b in zip(ex, v.boxes[0][0].tolist()))
    bright = (v.images[0, 0] > 0.5).nonzero()
    assert bright[:, 1].min() >= ex[0] - 1 and bright[:, 1].max() < ex[2] + 1
    # back to the original pixels (a 200×100 image)
    torch.testing.assert_close(unletterbox_boxes(v.boxes[0], v.crops[0], 64, 200, 100),
                               torch.tensor([[50.0, 25.0, 150.0, 50.0]]))


def test_square_images_at_their_size_pass_through_the_evaluation_view():
    x, m = _object_image(1.0, (0.1, 0.2, 0.6, 0.9))
    v = letterbox(x, m, [torch.tensor([[0.1, 0.2, 0.6, 0.9]])], S, None)
    assert torch.equal(v.images, x) and torch.equal(v.masks, m[:, 0].long())
    torch.testing.assert_close(v.boxes[0], torch.tensor([[0.1, 0.2, 0.6, 0.9]]) * S)


def test_random_crops_and_flips_keep_mask_box_and_pixels_together():
    box = (0.3, 0.2, 0.7, 0.6)
    x, m = _object_image(1.5, box)
    torch.manual_seed(0)
    seen_flip = seen_kept = 0
    for _ in range(40):
        v = dense_crop_flip(x, m, [torch.tensor([box])], 32, (0.3, 1.0), aspect=torch.tensor([1.5]), min_visible=0.4)
        mirrored = bool(v.crops[0, 2] < 0)
        if not len(v.boxes[0]):
            continue
        seen_kept += 1
        seen_flip += mirrored
        ex = _extent(v.masks[0], 3)
        assert all(abs(a - b) <= 1.5 for a, b in zip(ex, v.boxes[0][0].tolist())), (ex, v.boxes[0])
        on = v.images[0, 0] > 0.5
        assert ((v.masks[0] == 3) == on).float().mean() > 0.97  # the bright pixels are the mask's
    assert seen_kept > 10 and seen_flip > 2


def test_boxes_cut_by_a_crop_are_dropped_below_the_visible_fraction():
    x, m = _object_image(1.0, (0.0, 0.0, 0.2, 0.2))
    crop = torch.tensor([[0.6, 0.6, 0.8, 0.8]])  # a crop of the lower right that misses the object
    from selfsup.views.dense import _resample

    v = _resample(x, m, [torch.tensor([[0.0, 0.0, 0.2, 0.2]])], crop, 16, "reflection", 0.4)
    assert len(v.boxes[0]) == 0 and len(v.box_index[0]) == 0
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    v = _resample(x, m, [torch.tensor([[0.4, 0.4, 0.6, 0.6], [0.0, 0.0, 0.1, 0.1]])], whole, 16, "reflection", 0.4)
    assert v.box_index[0].tolist() == [0, 1]  # both wholly inside the whole-image crop
