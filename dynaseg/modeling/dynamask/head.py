"""DynaMask's mask head: the region-level FPN (r-FPN, paper §3.1, Fig. 2) with early exit.

L_tiny (14×14) is refined by three stages into L_small (28), L_medium (56) and L_large (112). Stage s
crops the i-FPN level P4 / P3 / P2 (strides 16 / 8 / 4) inside each RoI with aligned RoIAlign at the
level's own spatial scale, fuses the crop with the r-FPN feature in a Feature Aggregation Module
(FAM) and doubles the side. Every L has a mask and an edge predictor, so an instance can stop at any
resolution: ``forward_early_exit`` runs a stage only for the instances that need its output.

Symbols: N RoIs, C input (FPN) channels, K = 4 resolutions r_k = 14·2^k, w_k the width of L at r_k.
RoIs are (N, 5) rows [b, x0, y0, x1, y1] in input pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dynaseg.layers.norm import get_norm
from dynaseg.layers.roi_align import roi_align_aligned
from dynaseg.modeling.dynamask.fam import FeatureAggregationModule

__all__ = ["DynaMaskHead", "project_level_first"]


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    """Conv with Kaiming-normal (fan_out, ReLU) weights and a zero bias."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _level_stride(level: str) -> int:
    """FPN naming convention: level ``"p<l>"`` has stride 2^l input pixels (p2 → 4, p4 → 16)."""
    if not (level.startswith("p") and level[1:].isdigit()):
        raise ValueError(f"FPN level names look like 'p2'..'p5', got '{level}'")
    return 2 ** int(level[1:])


def project_level_first(num_rois: int, crop_side: int, level_shape: torch.Size) -> bool:
    """Whether a 1×1 conv costs less on the whole level (B, C, H, W) than on N crops of side² pixels."""
    return num_rois * crop_side * crop_side > level_shape[0] * level_shape[2] * level_shape[3]


class _InstanceLogits(nn.Module):
    """A 1×1 conv to ``num_outputs`` logit maps, evaluated only at each instance's own channel.

    ``num_outputs`` = C classes (class-specific: the instance's label picks the channel) or 1
    (class-agnostic). Picking the label's weight row before the product gives exactly the label
    channel of the full 1×1 conv at 1/C of its cost. Weights N(0, 0.001), zero bias (Mask R-CNN's
    mask predictor).
    """

    def __init__(self, in_channels: int, num_outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_outputs, in_channels))
        self.bias = nn.Parameter(torch.zeros(num_outputs))
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """x: (N, w, r, r); labels: (N,) int64 class ids → logits (N, r, r)."""
        index = (
            labels.long()
            if self.weight.shape[0] > 1
            else torch.zeros_like(labels, dtype=torch.long)
        )
        weight, bias = (
            self.weight.index_select(0, index),
            self.bias.index_select(0, index),
        )  # (N, w), (N,)
        return torch.einsum("nchw,nc->nhw", x, weight) + bias[:, None, None]


class _RefineStage(nn.Module):
    """The layers of one r-FPN stage (the crop itself is taken by ``DynaMaskHead.crop``).

    lateral: 1×1 conv + ReLU projecting the C-channel P_i crop to the FAM width.
    fam: FAM(L, lateral crop). reduce: 1×1 conv w_in → w_out, followed (in ``upsample``) by ×2
    bilinear upsampling and a ReLU. A 1×1 conv commutes exactly with bilinear interpolation
    (interpolation weights sum to 1), so reducing before upsampling equals "upsample, then reduce"
    at a quarter of the cost.
    """

    def __init__(
        self,
        *,
        pyramid_channels: int,
        in_width: int,
        out_width: int,
        fam_width: int,
        deform_groups: int,
        norm: str,
    ) -> None:
        super().__init__()
        self.lateral = _conv(pyramid_channels, fam_width, 1)
        self.fam = FeatureAggregationModule(
            channels=fam_width, deform_groups=deform_groups, norm=norm
        )
        self.reduce = _conv(in_width, out_width, 1)

    def upsample(self, x: Tensor) -> Tensor:
        """(N, w_in, r, r) → ReLU(up×2(reduce(x))): (N, w_out, 2r, 2r)."""
        return torch.relu(
            F.interpolate(self.reduce(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        )


class DynaMaskHead(nn.Module):
    """r-FPN mask head: L_tiny → L_small → L_medium → L_large with a mask/edge predictor at each.

    Stage s (0, 1, 2) takes L at side r_s = 14·2^s and the i-FPN level ``stage_levels[s]``
    (P4, P3, P2: Fig. 2's "{L_tiny, L_small, L_medium, L_large} are constantly enhanced by
    incorporating complementary information from {P2, P3, P4}"):

    * default, the paper (``fuse_after_upsample=True``; §3.1 "misalignments between L_r and P_i due
      to the upsampling and RoI pooling", Fig. 3 "upsampled r-FPN feature L_r and the cropped i-FPN
      feature P_i"): reduce to w_{s+1}, ×2 bilinear, ReLU, then crop P_i at 2·r_s, lateral → w_{s+1},
      FAM: P4 is fused at 28, P3 at 56, P2 at 112;
    * ``fuse_after_upsample=False`` (cheaper): crop P_i at r_s (spatial scale 1/stride of that level),
      lateral 1×1 → w_s, L' = FAM(L, crop), then reduce to w_{s+1}, ×2 bilinear, ReLU → side 2·r_s.

    Either way L_large is a real 112×112 feature map (w_3 channels) and its logits come from a 1×1
    conv on it, not from an upsampled 56×56 logit map.

    Predictors are 1×1 convs on every L: mask logits, and with ``edge_head=True`` separate edge
    logits (the official code's "detail" head; by default the edges of Eq. 4 are taken from each
    predicted mask instead, ``losses.predicted_mask_edges``). ``class_specific=True`` gives C
    channels on 14/28/56 and one class-agnostic channel on 112 (the official code's
    ``stage_num_classes=[80, 80, 80, 1]``); ``False`` makes all of them class-agnostic.

    Args:
        in_channels: C, the width of the 14×14 RoI features and of the FPN levels.
        num_classes: number of foreground classes (label ids 0..C-1).
        stage_channels: widths w_0..w_3 of L at 14/28/56/112. Halving as the side doubles keeps the
            w²-terms of each stage equal, but the offset convs (18 outputs) and the lateral (C inputs)
            grow with the side; the default (256, 136, 64, 24) makes every stage cost ≈ 0.39 GMAC at
            C = 256, as Table 7 implies (see ``cost.py``).
        num_instance_convs: 3×3 conv + ReLU layers from the RoI feature to L_tiny.
        class_specific: see above.
        stage_levels: FPN level cropped by each stage, stride 2^l taken from the name "p<l>".
        roi_size: side of the RoI features and of L_tiny (14).
        fuse_after_upsample: see above.
        crop_sampling_ratio: RoIAlign samples per bin for the P_i crops (0 = adaptive).
        deform_groups, norm: passed to each FAM; ``norm`` also follows each instance conv.
        edge_head: build the separate edge predictors (see above).
    """

    def __init__(
        self,
        *,
        in_channels: int = 256,
        num_classes: int,
        stage_channels: tuple[int, ...] = (256, 136, 64, 24),
        num_instance_convs: int = 2,
        class_specific: bool = True,
        stage_levels: tuple[str, ...] = ("p4", "p3", "p2"),
        roi_size: int = 14,
        fuse_after_upsample: bool = True,
        crop_sampling_ratio: int = 0,
        deform_groups: int = 1,
        norm: str = "none",
        edge_head: bool = False,
    ) -> None:
        super().__init__()
        if len(stage_channels) != len(stage_levels) + 1:
            raise ValueError(
                f"{len(stage_channels)} widths need {len(stage_channels) - 1} stage levels, "
                f"got {len(stage_levels)}"
            )
        if num_instance_convs == 0 and in_channels != stage_channels[0]:
            raise ValueError("without instance convs the RoI width must equal stage_channels[0]")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.class_specific, self.fuse_after_upsample = class_specific, fuse_after_upsample
        self.stage_levels = tuple(stage_levels)
        self.strides = tuple(_level_stride(level) for level in stage_levels)
        self.sides = tuple(roi_size * 2**k for k in range(len(stage_channels)))  # 14, 28, 56, 112
        self.crop_sampling_ratio = crop_sampling_ratio

        layers: list[nn.Module] = []
        for i in range(num_instance_convs):
            layers += [
                _conv(
                    in_channels if i == 0 else stage_channels[0],
                    stage_channels[0],
                    3,
                    bias=norm == "none",
                ),
                get_norm(norm, stage_channels[0]),
                nn.ReLU(inplace=True),
            ]
        self.instance_convs = nn.Sequential(*layers)
        self.stages = nn.ModuleList(
            _RefineStage(
                pyramid_channels=in_channels,
                in_width=stage_channels[s],
                out_width=stage_channels[s + 1],
                fam_width=stage_channels[s + 1] if fuse_after_upsample else stage_channels[s],
                deform_groups=deform_groups,
                norm=norm,
            )
            for s in range(len(stage_levels))
        )
        last = len(stage_channels) - 1
        outputs = [
            num_classes if class_specific and k < last else 1 for k in range(len(stage_channels))
        ]
        self.mask_predictors = nn.ModuleList(
            _InstanceLogits(w, n) for w, n in zip(stage_channels, outputs)
        )
        self.edge_predictors = (
            nn.ModuleList(_InstanceLogits(w, n) for w, n in zip(stage_channels, outputs))
            if edge_head
            else None
        )

    @property
    def num_resolutions(self) -> int:
        """K: the number of mask resolutions (4)."""
        return len(self.sides)

    @property
    def crop_sides(self) -> tuple[int, ...]:
        """Side of the P_i crop of each stage: r_s, or 2·r_s with ``fuse_after_upsample``."""
        return self.sides[1:] if self.fuse_after_upsample else self.sides[:-1]

    def tiny(self, roi_feats: Tensor) -> Tensor:
        """L_tiny: (N, C, 14, 14) RoI features → (N, w_0, 14, 14)."""
        return self.instance_convs(roi_feats)

    def crop(self, s: int, features: dict[str, Tensor], rois: Tensor) -> Tensor:
        """The raw P_i crop of stage s: aligned RoIAlign of ``features[stage_levels[s]]`` at spatial
        scale 1/stride of that level. features: {"p2": (B, C, Hp/4, Wp/4), ...}; rois: (N, 5)
        → (N, C, crop_sides[s], crop_sides[s])."""
        return roi_align_aligned(
            features[self.stage_levels[s]],
            rois,
            output_size=self.crop_sides[s],
            spatial_scale=1.0 / self.strides[s],
            sampling_ratio=self.crop_sampling_ratio,
        )

    def lateral_crop(
        self, s: int, features: dict[str, Tensor], rois: Tensor, project_first: bool | None = None
    ) -> Tensor:
        """ReLU(lateral(P_i crop)) of stage s: (N, w, crop_sides[s], crop_sides[s]).

        RoIAlign is a per-channel weighted sum of pixels whose weights sum to 1 for boxes inside the
        image, so it commutes exactly with the 1×1 lateral conv (bias included). The cheaper order is
        taken: crop C channels per RoI, or project the whole level once and crop only w channels
        (training, with many RoIs and C ≫ w, is several times faster this way). ``project_first``
        forces an order (None: the cheaper one).
        """
        block, level, side = self.stages[s], features[self.stage_levels[s]], self.crop_sides[s]
        if project_first is None:  # a trace crops first: the cheaper order depends on N
            project_first = not torch.jit.is_tracing() and project_level_first(
                rois.shape[0], side, level.shape
            )
        if not project_first:
            return torch.relu(block.lateral(self.crop(s, features, rois)))
        projected = {self.stage_levels[s]: block.lateral(level)}
        return torch.relu(self.crop(s, projected, rois))

    def stage(
        self,
        s: int,
        region: Tensor,
        features: dict[str, Tensor],
        rois: Tensor,
        project_first: bool | None = None,
    ) -> Tensor:
        """Stage s: L at r_s (N, w_s, r_s, r_s) and its N RoIs → L at 2·r_s (N, w_{s+1}, 2r_s, 2r_s).
        ``project_first``: see ``lateral_crop``."""
        block = self.stages[s]
        if self.fuse_after_upsample:
            return block.fam(
                block.upsample(region), self.lateral_crop(s, features, rois, project_first)
            )
        return block.upsample(
            block.fam(region, self.lateral_crop(s, features, rois, project_first))
        )

    def mask_logits_at(self, k: int, region: Tensor, labels: Tensor) -> Tensor:
        """Mask logits at resolution k: L (N, w_k, r_k, r_k), labels (N,) → (N, r_k, r_k)."""
        return self.mask_predictors[k](region, labels)

    def edge_logits_at(self, k: int, region: Tensor, labels: Tensor) -> Tensor:
        """Edge logits of the separate edge head at resolution k (``edge_head=True``): (N, r_k, r_k)."""
        if self.edge_predictors is None:
            raise RuntimeError("this head has no edge predictors (edge_head=False)")
        return self.edge_predictors[k](region, labels)

    def forward_all(
        self, roi_feats: Tensor, features: dict[str, Tensor], rois: Tensor, labels: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Every stage for every RoI (training: Eq. 3/4 need all K predictions).

        roi_feats: (N, C, 14, 14); features: FPN maps; rois: (N, 5); labels: (N,) int64
        → (mask logits, edge logits), each a list of K tensors (N, r_k, r_k), r_k = 14/28/56/112;
        the edge list is empty without the edge head.
        """
        region = self.tiny(roi_feats)
        masks, edges = [], []
        for k in range(self.num_resolutions):
            masks.append(self.mask_logits_at(k, region, labels))
            if self.edge_predictors is not None:
                edges.append(self.edge_logits_at(k, region, labels))
            if k < self.num_resolutions - 1:
                region = self.stage(k, region, features, rois)
        return masks, edges

    def forward_early_exit(
        self,
        roi_feats: Tensor,
        features: dict[str, Tensor],
        rois: Tensor,
        labels: Tensor,
        choice: Tensor,
        last: int | None = None,
    ) -> Tensor:
        """Inference with per-instance early exit: each RoI stops at its chosen resolution.

        All RoIs run L_tiny; stage s runs, batched, only on the RoIs with choice > s (the others
        have left), and each RoI's mask logits are predicted only at its own resolution (no edge
        logits). The result equals taking forward_all's mask at ``choice`` per RoI. Traceable: the
        subsets are data-dependent shapes, no stage is skipped in a trace.

        roi_feats: (N, C, 14, 14); rois: (N, 5); labels, choice: (N,) int64, choice in 0..last
        (``last``: the largest index any RoI may choose, K-1 by default) → (N, R, R) mask logits,
        R = sides[last]: RoI i's r_i × r_i logits at the top left, -inf (probability 0) elsewhere.
        """
        n = roi_feats.shape[0]
        last = self.num_resolutions - 1 if last is None else last
        if choice.shape != (n,):
            raise ValueError(f"choice must be ({n},), got {tuple(choice.shape)}")
        tracing = torch.jit.is_tracing()
        if not tracing and n and (int(choice.min()) < 0 or int(choice.max()) > last):
            raise ValueError(f"choice must be in 0..{last}")
        largest = self.sides[last]
        out = roi_feats.new_full((n, largest, largest), float("-inf"))
        alive = torch.arange(n, device=roi_feats.device)  # RoI index of each row of `region`
        region = self.tiny(roi_feats)
        for k in range(last + 1):
            alive_choice = choice.index_select(0, alive)
            leaving = (alive_choice == k).nonzero().squeeze(1)
            rows = alive.index_select(0, leaving)
            logits = self.mask_logits_at(
                k, region.index_select(0, leaving), labels.index_select(0, rows)
            )
            pad = largest - self.sides[k]
            out = out.index_put((rows,), F.pad(logits, (0, pad, 0, pad), value=float("-inf")))
            if k == last:
                break
            staying = (alive_choice > k).nonzero().squeeze(1)
            if not tracing and staying.numel() == 0:
                break  # nobody goes on: the larger stages never run
            alive, region = alive.index_select(0, staying), region.index_select(0, staying)
            region = self.stage(k, region, features, rois.index_select(0, alive))
        return out
