"""Input normalisation shared by every meta-architecture."""

from __future__ import annotations

from torch import Tensor

from dynaseg.layers.dynamic_shapes import image_size_tensor, valid_pixels

__all__ = ["normalize_images"]


def normalize_images(
    images: Tensor,
    image_sizes: Tensor | list[tuple[int, int]],
    pixel_mean: Tensor,
    pixel_std: Tensor,
) -> Tensor:
    """(B, 3, Hp, Wp) RGB 0-255 → (x - mean) / std, with the padding set to 0 after normalisation.

    image_sizes: valid (h, w) per image, pairs or a (B, 2) tensor. pixel_mean, pixel_std:
    (1, 3, 1, 1). Zero padding in normalised space is detectron2's convention.
    """
    sizes = image_size_tensor(image_sizes, images.device)
    x = (images - pixel_mean) / pixel_std
    return x * valid_pixels(sizes, images.shape[-2], images.shape[-1]).to(x.dtype)
