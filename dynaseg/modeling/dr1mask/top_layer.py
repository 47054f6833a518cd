"""DR1Mask's top layer (paper §3.2.1, Eq. 5): instance embeddings and DR1Basis context factors.

One 3×3 convolution on the FCOS box tower gives, at every location of every level, the instance
embedding e and the context C^l = [A^l, B^l] of the DR1Conv at that level of DR1Basis. Its output
channels are held as two convolutions (embedding | context), which is the same layer: the context
part runs densely (DR1Basis needs every pixel), the embedding part only where it is needed
(positives, kept detections) via ``conv3x3_at_locations``.

``context_position`` moves the context part onto the class tower or the FPN outputs (paper Table 3
ablation); the embedding always comes from the box tower.

The factors are A = 1 + a and B = 1 + b with the context weights and bias zero-initialised, so at
initialisation A = B = 1 and every DR1Conv is its plain convolution.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from dynaseg.layers.sparse_conv import conv3x3_at_locations

__all__ = ["DR1TopLayer", "ContextPosition"]

ContextPosition = Literal["box_tower", "cls_tower", "fpn"]


class DR1TopLayer(nn.Module):
    """Args:
    in_channels: tower / FPN width F.
    embedding_dim: E, length of the instance embedding (set by the instance predictor).
    basis_channels: C_F, width of DR1Basis (A and B each have C_F channels).
    context_position: which features the context is computed from (Table 3).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        embedding_dim: int,
        basis_channels: int,
        context_position: ContextPosition = "box_tower",
    ) -> None:
        super().__init__()
        if context_position not in ("box_tower", "cls_tower", "fpn"):
            raise ValueError(
                f"context_position must be box_tower, cls_tower or fpn, got '{context_position}'"
            )
        self.context_position = context_position
        self.basis_channels = basis_channels
        self.embedding = nn.Conv2d(in_channels, embedding_dim, 3, padding=1)
        self.context = nn.Conv2d(in_channels, 2 * basis_channels, 3, padding=1)
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.embedding.bias)
        nn.init.zeros_(self.context.weight)
        nn.init.zeros_(self.context.bias)

    def context_factors(self, features: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Per level (B, F, H_l, W_l) → (A^l, B^l), each (B, C_F, H_l, W_l), both 1 at initialisation."""
        out = []
        for x in features:
            a, b = (1.0 + self.context(x)).split(self.basis_channels, dim=1)
            out.append((a, b))
        return out

    def embeddings_at(
        self, box_tower: list[Tensor], image_index: Tensor, location_index: Tensor
    ) -> Tensor:
        """Embeddings at N locations: box tower per level, (N,) image and flat location indices → (N, E)."""
        return conv3x3_at_locations(
            box_tower, self.embedding.weight, self.embedding.bias, image_index, location_index
        )
