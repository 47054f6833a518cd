"""Resolution statistics of DynaMask results: overall, per class, per COCO size bucket, mean cost."""

import pytest

from dynaseg.evaluation.resolutions import (
    format_resolution_table,
    resolution_statistics,
    size_bucket,
)


def test_size_buckets_follow_coco_thresholds():
    assert size_bucket([0, 0, 31, 33]) == "small" and size_bucket([5, 5, 32, 32]) == "medium"
    assert size_bucket([0, 0, 95, 97]) == "medium" and size_bucket([0, 0, 96, 96]) == "large"


def test_statistics_by_class_size_and_cost():
    results = [
        {"category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9, "mask_resolution": 14},
        {"category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.9, "mask_resolution": 28},
        {"category_id": 2, "bbox": [0, 0, 200, 100], "score": 0.8, "mask_resolution": 112},
        {"category_id": 2, "bbox": [0, 0, 40, 40], "score": 0.7, "mask_resolution": 112},
        {
            "category_id": 2,
            "bbox": [0, 0, 40, 40],
            "score": 0.1,
            "mask_resolution": 14,
        },  # below threshold
    ]
    stats = resolution_statistics(
        results,
        {1: "circle", 2: "star"},
        {14: 1.0, 28: 2.0, 56: 3.0, 112: 4.0},
        score_threshold=0.5,
    )
    assert stats["num_instances"] == 4
    assert stats["overall"] == {"14": 0.25, "28": 0.25, "56": 0.0, "112": 0.5}
    assert stats["per_class"]["star"] == {"14": 0.0, "28": 0.0, "56": 0.0, "112": 1.0}
    assert stats["per_size"]["medium"] == {"14": 0.0, "28": 0.5, "56": 0.0, "112": 0.5}
    assert stats["per_size"]["small"]["14"] == 1.0 and stats["per_size"]["large"]["112"] == 1.0
    assert stats["mean_gmac_per_instance"] == pytest.approx((1 + 2 + 4 + 4) / 4)
    table = format_resolution_table(stats)
    assert "[medium]" in table and "2.750 GMAC per instance (4 instances)" in table


def test_easy_and_hard_shapes_by_size_fig8():
    """Fig. 8's question as a table: at equal size, which sides did easy and hard shapes get?"""
    results = [
        {"category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.9, "mask_resolution": 14},
        {"category_id": 1, "bbox": [0, 0, 60, 40], "score": 0.9, "mask_resolution": 28},
        {"category_id": 2, "bbox": [0, 0, 50, 50], "score": 0.9, "mask_resolution": 112},
        {"category_id": 2, "bbox": [0, 0, 10, 10], "score": 0.9, "mask_resolution": 56},
        {"category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.9, "mask_resolution": 56},
    ]
    stats = resolution_statistics(
        results,
        {1: "circle", 2: "star", 3: "gear"},
        category_groups={1: "easy", 2: "hard", 3: "hard"},
    )
    cells = stats["per_group_size"]
    assert list(cells) == ["easy", "hard"]
    assert cells["easy"]["medium"] == {
        "count": 2,
        "mean_side": 21.0,
        "14": 0.5,
        "28": 0.5,
        "56": 0.0,
        "112": 0.0,
    }
    assert cells["hard"]["medium"]["count"] == 2 and cells["hard"]["medium"]["mean_side"] == 84.0
    assert cells["hard"]["small"]["56"] == 1.0 and cells["easy"]["small"] == {
        "count": 0,
        "mean_side": None,
        "14": 0.0,
        "28": 0.0,
        "56": 0.0,
        "112": 0.0,
    }
    table = format_resolution_table(stats)
    assert (
        "[hard/medium]" in table and "mean side 84.0 (n=2)" in table and "[easy/small]" not in table
    )
    assert "per_group_size" not in resolution_statistics(results, {1: "circle"})
