"""``pipeline bench stream``: the three loaders read the same generated shards and the table says so; the
object-store bytes per view of repeated augmentation are a third of the peers'. Rates are not checked (a
speed claim is the table's ratio, measured in one run; see BENCHMARKS.md)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.dali


def test_bench_stream_prints_the_three_loaders_with_bytes_per_view() -> None:
    from pipeline.bench_stream import bench_stream

    table = bench_stream(images=24, batch=8, workers=1, views=24, size=64, rounds=2)
    names = (r"dali x3|dali|timm\+PIL DataLoader|dali, crop only, whole decode|dali, crop only, DALI's resize|"
             r"dali x3, crop only, DALI's resize|dali, crop only|dali x3, crop only|timm\+PIL, crop only")
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)), float(m.group(4)))
            for m in re.finditer(rf"^({names})\s+(\d+)\s+([\d.]+)\s+([\d.]+)(?:\s+[\d.]+-[\d.]+)?$", table, re.M)}
    assert set(rows) == {"dali", "dali x3", "timm+PIL DataLoader", "dali, crop only", "dali, crop only, whole decode",
                         "dali x3, crop only", "timm+PIL, crop only", "dali, crop only, DALI's resize",
                         "dali x3, crop only, DALI's resize"}, table
    assert rows["timm+PIL, crop only"][2] == 1.0, "the crop-only rows are a ratio to the peers' crop-only"
    assert all(rate > 0 for rate, _, _ in rows.values())
    assert rows["timm+PIL DataLoader"][2] == 1.0
    one, three, peer = rows["dali"][1], rows["dali x3"][1], rows["timm+PIL DataLoader"][1]
    assert three < 0.45 * peer and three < 0.45 * one, "x3 decodes once for 3 views: a third of the bytes"
    assert rows["dali x3, crop only"][1] < 0.45 * rows["dali, crop only"][1], "the crop-only x3 row reads once too"
    assert "24 images" in table and "2 rounds" in table
    spreads = {name: tuple(map(float, spread)) for name, *spread in
               re.findall(rf"^({names})\s+\d+\s+[\d.]+\s+[\d.]+\s+([\d.]+)-([\d.]+)$", table, re.M)}
    assert set(spreads) == {"dali", "dali x3", "timm+PIL DataLoader"}, "the loaders that run in rounds"
    assert spreads["timm+PIL DataLoader"] == (1.0, 1.0)
    for name, (low, high) in spreads.items():
        assert low <= rows[name][2] <= high, "the ratio is the median of the per-round ratios"
    resize = dict(re.findall(r"^(dali fn\.resize|torch interpolate \(the CPU's cut\)|PIL Image\.resize)\s+\d+\s+"
                             r"([\d.]+)$", table, re.M))
    assert set(resize) == {"dali fn.resize", "torch interpolate (the CPU's cut)", "PIL Image.resize"}, table
    assert resize["PIL Image.resize"] == "1.00", table
