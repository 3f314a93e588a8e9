"""Defect regions: connected regions of a thresholded map (box, area, peak), scaling, box IoU, regions.json."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from task.anomaly.unsupervised.image.region_file import best_box_iou, regions_of_test_set
from task.anomaly.unsupervised.image.visualize import outline_regions, render_result
from task.anomaly.unsupervised.records import Predictions
from task.anomaly.unsupervised.regions import box_iou, find_regions, mask_boxes, regions_record, scale_regions


def _map() -> np.ndarray:
    scores = np.zeros((32, 48), dtype=np.float32)
    scores[2:6, 3:10] = 0.8  # 4 x 7 = 28 px
    scores[4, 5] = 0.95
    scores[20:30, 30:33] = 0.6  # 10 x 3 = 30 px
    scores[25, 31] = 2.0
    scores[15, 15] = 0.9  # 1 px: noise
    return scores


def test_regions_have_box_area_and_peak_sorted_by_peak():
    regions = find_regions(_map(), 0.5, min_area=4)
    assert [(r.box, r.area, r.peak, (r.peak_x, r.peak_y)) for r in regions] == [
        ((30, 20, 3, 10), 30, 2.0, (31, 25)),
        ((3, 2, 7, 4), 28, pytest.approx(0.95), (5, 4)),
    ]
    assert len(find_regions(_map(), 0.5, min_area=1)) == 3  # the single pixel counts without a minimum area
    assert find_regions(_map(), 0.85, min_area=1)[1].area == 1  # only the peaks pass a higher threshold
    assert find_regions(_map(), math.nan) == [] and find_regions(_map(), 5.0) == []
    # 8-connectivity: diagonal neighbours are one region; NaN pixels are below any threshold.
    diagonal = np.eye(5, dtype=np.float32)
    diagonal[0, 4] = np.nan
    assert [r.box for r in find_regions(diagonal, 0.5)] == [(0, 0, 5, 5)]
    with pytest.raises(ValueError):
        find_regions(np.zeros((2, 2, 2)), 0.5)


def test_scaling_and_the_json_record():
    region = find_regions(_map(), 0.5, min_area=4)[1]
    scaled = scale_regions([region], 2.5, 0.5)[0]
    assert scaled.box == (7, 1, 18, 2) and scaled.area == 35 and scaled.peak == region.peak
    assert (scaled.peak_x, scaled.peak_y) == (13, 2)
    assert regions_record([region]) == [{"box": [3, 2, 7, 4], "area": 28, "peak": 0.95, "peak_xy": [5, 4]}]


def test_box_iou_and_mask_boxes():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 2, 2), (5, 5, 2, 2)) == 0.0 and box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    mask = (_map() >= 0.5).astype(np.uint8)
    assert sorted(mask_boxes(mask)) == [(3, 2, 7, 4), (15, 15, 1, 1), (30, 20, 3, 10)]
    regions = find_regions(_map(), 0.5, min_area=4)
    truth = np.zeros_like(mask)
    truth[2:6, 3:10] = 1  # only the second region is a true defect
    assert best_box_iou(regions, truth) == (0.0, 1.0)
    assert best_box_iou([], truth) == (0.0, 0.0)


def test_regions_json_record_of_a_test_set():
    maps = torch.from_numpy(np.stack([_map(), np.zeros((32, 48), np.float32)]))
    masks = torch.zeros(2, 32, 48, dtype=torch.uint8)
    masks[0, 20:30, 30:33] = 1
    preds = Predictions(
        maps, torch.tensor([2.0, 0.1]), torch.tensor([1, 0]), masks, ["a.png", "b.png"], ["cut", "good"]
    )
    record = regions_of_test_set(preds, 0.5, 4)
    assert (
        record["mean_top_box_iou"] == 1.0
        and record["mean_best_box_iou"] == 1.0
        and record["defective_images_with_masks"] == 1
    )
    assert [len(image["regions"]) for image in record["images"]] == [2, 0]
    assert "top_box_iou" not in record["images"][1]
    assert regions_of_test_set(preds, math.nan, 4)["pixel_threshold"] is None


def test_pictures_box_and_number_the_regions():
    image = np.full((32, 48, 3), 100, np.uint8)
    regions = find_regions(_map(), 0.5, min_area=4)
    outlined = outline_regions(image, regions)
    boxed = np.all(outlined == (0, 230, 255), axis=-1)
    assert boxed[20, 30:33].all() and boxed[2, 3:10].all()  # the top edges of both boxes
    assert not boxed[15, 15]
    picture = render_result(image, _map(), (0.0, 1.0), 2.0, 1.0, 0.5, regions=regions)
    assert np.all(picture[-32:, 96:][boxed] == (0, 230, 255))  # the prediction panel carries the boxes
