"""DR1Mask's instance prediction module (paper §3.2.3, Eq. 7-8, Table 4).

The basis F (C_F channels) is RoIAligned in each box to R^(i) (C_F, R, R) and combined with the
instance's embedding e^(i) in one of three ways:

* ``factored`` (the paper's): e = [W (K·C_F), s (K·D)]. W is a dynamic 1×1 conv projecting the crop
  to K maps, P = W ∗ R (Eq. 7); the attention of map k is Q_k = U_k diag(s_k) V_k (Eq. 8) with
  U_k (M×D) and V_k (D×M) static parameters shared by all instances; then, as in BlendMask,
  m = Σ_k softmax_k(Up(Q))_k ∘ P_k with Q upsampled M → R bilinearly.
* ``full`` (BlendMask's attention on a projected crop): e = [W (K·C_F), a (K·M·M)], Q = a.
* ``vector`` (YOLACT-like): e (C_F); m = Σ_c e_c R_c, a dynamic 1×1 conv to one map.

For panoptic segmentation each instance also needs a C_F-vector, the dynamic column of the
panoptic layer (§3.3): the ``vector`` embedding itself, or for the other two an extra C_F slice
at the end of e (the paper does not say which part of a non-vector embedding is used;
reconstructed, see docs/fidelity.md).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from dynaseg.modeling.one_stage.blender import blend

__all__ = ["InstancePredictor", "AttentionKind", "dynamic_projection"]

AttentionKind = Literal["factored", "full", "vector"]


def dynamic_projection(
    pooled: Tensor, weights: Tensor, source_index: Tensor | None = None
) -> Tensor:
    """Per-instance 1×1 convs on RoI crops: out_n = weights_n ∗ pooled_{source_index[n]}.

    pooled: (G, C, R, R); weights: (N, K, C); source_index: (N,) row of ``pooled`` each weight set
    applies to (None: row n) → (N, K, R, R). Training has many positives per ground-truth crop, so
    the crops are not gathered per positive: each crop is multiplied once by all its positives' weights.
    """
    g, c, r, _ = pooled.shape
    n, k, _ = weights.shape
    if source_index is None:
        return torch.bmm(weights, pooled.flatten(2)).view(n, k, r, r)
    order = torch.argsort(source_index)
    sources, counts = torch.unique_consecutive(source_index[order], return_counts=True)
    crops = pooled.flatten(2).unbind(0)  # views; backward is one stack, not a zero-fill per crop
    grouped = [
        torch.matmul(weights[rows], crops[src])
        for src, rows in zip(sources.tolist(), order.split(counts.tolist()))
    ]
    out = torch.cat(grouped)[torch.argsort(order)] if grouped else pooled.new_zeros((0, k, r * r))
    return out.view(n, k, r, r)


class InstancePredictor(nn.Module):
    """Args:
    kind: factored | full | vector (Table 4).
    channels: C_F. num_bases: K (4, BlendMask's). attention_size: M. rank: D of Eq. 8.
    panoptic: reserve the panoptic column slice in the embedding (non-vector kinds).
    """

    def __init__(
        self,
        *,
        kind: AttentionKind = "factored",
        channels: int,
        num_bases: int = 4,
        attention_size: int = 14,
        rank: int = 4,
        panoptic: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("factored", "full", "vector"):
            raise ValueError(f"attention must be factored, full or vector, got '{kind}'")
        self.kind, self.channels, self.num_bases = kind, channels, num_bases
        self.attention_size, self.rank, self.panoptic = attention_size, rank, panoptic
        if kind == "factored":
            self.u = nn.Parameter(torch.randn(num_bases, attention_size, rank))  # U_k: (M, D)
            self.v = nn.Parameter(torch.randn(num_bases, rank, attention_size))  # V_k: (D, M)

    @property
    def attention_dim(self) -> int:
        """Length of the attention part of e: K·D (factored), K·M·M (full), 0 (vector)."""
        return {
            "factored": self.num_bases * self.rank,
            "full": self.num_bases * self.attention_size**2,
            "vector": 0,
        }[self.kind]

    @property
    def embedding_dim(self) -> int:
        """E: projection (K·C_F, or C_F for vector) + attention + panoptic slice."""
        if self.kind == "vector":
            return self.channels
        return (
            self.num_bases * self.channels
            + self.attention_dim
            + (self.channels if self.panoptic else 0)
        )

    def attention(self, embedding: Tensor) -> Tensor:
        """Attention logits Q: (N, E) → (N, K, M, M); Eq. 8 for ``factored``."""
        k, m, c = self.num_bases, self.attention_size, self.channels
        a = embedding[:, k * c : k * c + self.attention_dim]
        if self.kind == "full":
            return a.reshape(-1, k, m, m)
        s = a.reshape(-1, k, self.rank)  # diagonals of Σ_k
        return torch.einsum("kid,nkd,kdj->nkij", self.u, s, self.v)

    def forward(
        self, pooled: Tensor, embedding: Tensor, source_index: Tensor | None = None
    ) -> Tensor:
        """Mask logits.

        pooled: (G, C_F, R, R) RoI crops of F; embedding: (N, E); source_index: (N,) crop of each
        embedding (None: crop n) → (N, R, R).
        """
        if self.kind == "vector":
            return dynamic_projection(pooled, embedding[:, None, :], source_index)[:, 0]
        k, c = self.num_bases, self.channels
        projected = dynamic_projection(
            pooled, embedding[:, : k * c].reshape(-1, k, c), source_index
        )
        return blend(projected, self.attention(embedding))

    def panoptic_columns(self, embedding: Tensor) -> Tensor:
        """The panoptic layer's dynamic weights of each embedding: (N, E) → (N, C_F)."""
        if self.kind == "vector":
            return embedding
        if not self.panoptic:
            raise RuntimeError(
                "this predictor was built without the panoptic slice (panoptic=False)"
            )
        return embedding[:, -self.channels :]
