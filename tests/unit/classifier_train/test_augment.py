from __future__ import annotations

import torch

from services.classifier.train.augment import AugmentSettings, augment_batch, flip_table
from services.classifier.train.data import BACKGROUND_CLASS


def test_flip_table_swaps_mirrored_pairs_and_forbids_the_rest() -> None:
    table = flip_table(BACKGROUND_CLASS + 1)
    assert table[33] == 34
    assert table[34] == 33
    assert table[38] == 39
    assert table[19] == 20
    assert table[14] == -1  # "STOP" text must never be mirrored
    assert table[1] == -1  # "30"
    assert table[13] == 13  # yield is symmetric
    assert table[BACKGROUND_CLASS] == BACKGROUND_CLASS
    valid = table[table >= 0]
    assert torch.equal(table[valid], torch.arange(len(table))[table >= 0])  # a flip of a flip is the identity


def test_augment_keeps_shape_range_and_only_legal_labels() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (64, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.tensor([33, 14, 13, BACKGROUND_CLASS] * 16)
    x, y = augment_batch(images, labels, AugmentSettings(p_flip=1.0), g)
    assert x.shape == (64, 3, 32, 32)
    assert x.dtype == torch.float32
    assert float(x.min()) >= 0
    assert float(x.max()) <= 1
    assert torch.equal(y[labels == 33], torch.full_like(y[labels == 33], 34))
    assert torch.equal(y[labels == 14], labels[labels == 14])


def test_augment_is_reproducible_with_the_same_seed() -> None:
    images = torch.randint(0, 255, (8, 24, 24, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(8, dtype=torch.int64)
    a, _ = augment_batch(images, labels, AugmentSettings(), torch.Generator().manual_seed(5))
    b, _ = augment_batch(images, labels, AugmentSettings(), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
