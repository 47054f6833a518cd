"""Resolution statistics of DynaMask results: overall, per class, per COCO size bucket, mean cost."""
import pytest

from dynaseg.evaluation.resolutions import format_resolution_table, resolution_statistics, size_bucket


def test_size_buckets_follow_coco_thresholds():
    assert size_bucket([0, 0, 31, 33]) == "small" and size_bucket([5, 5, 32, 32]) == "medium"
    assert size_bucket([0, 0, 95, 97]) == "medium" and size_bucket([0, 0, 96, 96]) == "large"


def test_statistics_by_class_size_and_cost():
    results = [
        {"category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9, "mask_resolution": 14},
        {"category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.9, "mask_resolution": 28},
        {"category_id": 2, "bbox": [0, 0, 200, 100], "score": 0.8, "mask_resolution": 112},
        {"category_id": 2, "bbox": [0, 0, 40, 40], "score": 0.7, "mask_resolution": 112},
        {"category_id": 2, "bbox": [0, 0, 40, 40], "score": 0.1, "mask_resolution": 14},   # below threshold
    ]
    stats = resolution_statistics(results, {1: "circle", 2: "star"}, {14: 1.0, 28: 2.0, 56: 3.0, 112: 4.0},
                                  score_threshold=0.5)
    assert stats["num_instances"] == 4
    assert stats["overall"] == {"14": 0.25, "28": 0.25, "56": 0.0, "112": 0.5}
    assert stats["per_class"]["star"] == {"14": 0.0, "28": 0.0, "56": 0.0, "112": 1.0}
    assert stats["per_size"]["medium"] == {"14": 0.0, "28": 0.5, "56": 0.0, "112": 0.5}
    assert stats["per_size"]["small"]["14"] == 1.0 and stats["per_size"]["large"]["112"] == 1.0
    assert stats["mean_gmac_per_instance"] == pytest.approx((1 + 2 + 4 + 4) / 4)
    table = format_resolution_table(stats)
    assert "[medium]" in table and "2.750 GMAC per instance (4 instances)" in table
