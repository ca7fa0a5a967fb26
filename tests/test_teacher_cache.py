"""Teacher cache: map encoding and pooling, a build through a real local Ray cluster (folder and S3),
resume, identity checks, and cached-vs-online labels on the same views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pipeline.build import BuildConfig, build_shards
from pipeline.demo import write_digits_tree
from pipeline.storage import Location
from pipeline.stream import ShardSet
from teacher_cache.build import CacheBuildConfig, build_cache
from teacher_cache.cache import CacheMismatch, TeacherCache, part_name
from teacher_cache.maps import box_weights, encode, mixed, pooled_logits
from teacher_cache.teacher import Teacher, TeacherError, TeacherSpec

pytestmark = [pytest.mark.dali, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _own_ray():
    """build_cache starts a local Ray in this process; later modules start their own, so stop it here."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def test_encode_with_all_classes_is_lossless_and_pooling_is_an_overlap_mean() -> None:
    maps = torch.randn(2, 12, 3, 3)
    enc = encode(maps, 12)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1 / 3, 2 / 3]])
    weights = box_weights(boxes, 3, 3)
    assert torch.allclose(weights.sum(1), torch.ones(2))
    assert torch.allclose(weights[1].view(3, 3), torch.tensor([[0.5, 0.5, 0], [0, 0, 0], [0, 0, 0]]))
    got = pooled_logits(*(torch.from_numpy(a) for a in (enc.indices, enc.values, enc.floor)), weights, 12)
    expected = torch.einsum("bl,bcl->bc", weights, maps.reshape(2, 12, 9))
    assert torch.allclose(got, expected, atol=1e-2)


def test_top_k_keeps_the_peak_and_the_tail_mass() -> None:
    maps = torch.full((1, 100, 2, 2), -1.0)
    maps[0, 7] = 5.0  # a confident teacher: class 7 everywhere
    enc = encode(maps, 3)
    out = pooled_logits(*(torch.from_numpy(a) for a in (enc.indices, enc.values, enc.floor)),
                        box_weights(torch.tensor([[0.2, 0.2, 0.9, 0.6]]), 2, 2), 100)
    assert out.argmax().item() == 7 and torch.allclose(out[0, 0], torch.tensor(-1.0))
    assert torch.allclose(mixed(torch.eye(2), 0.7), torch.tensor([[0.7, 0.3], [0.3, 0.7]]))


def test_the_map_mean_is_the_teachers_logits(tmp_path: Path) -> None:
    model = timm.create_model("resnet10t", num_classes=10)
    torch.save({"model": model.state_dict()}, tmp_path / "t.pt")  # the official DeiT checkpoint layout
    teacher = Teacher(TeacherSpec("resnet10t", str(tmp_path / "t.pt"), 10, 64))
    x = torch.randn(3, 3, 64, 64)
    assert torch.allclose(teacher.logit_map(x).mean((2, 3)), teacher.logits(x), atol=1e-5)
    assert len(teacher.identity["weights_sha256"]) == 64
    vit = Teacher(TeacherSpec("deit_tiny_patch16_224", None, 10, 224))
    with pytest.raises(TeacherError, match="distill.source=online"):
        vit.logit_map(torch.randn(1, 3, 224, 224))


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardSet, str]:
    root = tmp_path_factory.mktemp("cache")
    write_digits_tree(root / "digits", size=32)
    build_shards(BuildConfig(src=str(root / "digits"), dst=Location(str(root / "shards")), shard_bytes=400_000,
                             workers=1))
    model = timm.create_model("resnet10t", num_classes=10)
    torch.save(model.state_dict(), root / "teacher.pt")
    return ShardSet.open(Location(str(root / "shards")), "train"), str(root / "teacher.pt")


def test_build_through_ray_into_a_folder_resume_and_refusals(digits, tmp_path: Path) -> None:
    shards, weights = digits
    spec = TeacherSpec("resnet10t", weights, 10, 64)
    out = Location(str(tmp_path / "cache"))
    cfg = CacheBuildConfig(shards=shards.location, out=out, teacher=spec, topk=4, workers=2)
    info = build_cache(cfg)
    assert info["num_samples"] == len(shards) and info["map"] == {"height": 2, "width": 2, "k": 4}
    assert info["dataset"]["fingerprint"] == shards.fingerprint
    parts = sorted(p.name for p in (tmp_path / "cache").glob("train-*.parquet"))
    assert parts == [part_name("train", s) for s in sorted(shards.shard_names)]
    # resume: a lost part (and no cache.json) is rebuilt, the others kept
    before = {p: (tmp_path / "cache" / p).stat().st_mtime_ns for p in parts}
    (tmp_path / "cache" / "cache.json").unlink()
    (tmp_path / "cache" / parts[1]).unlink()
    build_cache(cfg)
    after = {p: (tmp_path / "cache" / p).stat().st_mtime_ns for p in parts}
    assert [p for p in parts if before[p] != after[p]] == [parts[1]]

    teacher = Teacher(spec)
    cache = TeacherCache(out, shards, teacher.identity)
    # the whole image's box gives the teacher's logits on the whole (resized) image, up to fp16 + top-k
    rows = np.arange(8)
    full = cache.logits(rows, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 8))
    assert full.shape == (8, 10) and torch.isfinite(full).all()
    with pytest.raises(CacheMismatch, match="weights_sha256"):
        TeacherCache(out, shards, {**teacher.identity, "weights_sha256": "0" * 64})
    with pytest.raises(CacheMismatch, match="resolution"):
        TeacherCache(out, shards, {**teacher.identity, "resolution": 224})
    other = ShardSet.open(shards.location, "train")
    other.fingerprint = "f" * 64
    with pytest.raises(CacheMismatch, match="built for dataset"):
        TeacherCache(out, other, teacher.identity)
    # a re-run of the build for another teacher (resolution, weights) or another k is refused, not skipped
    from dataclasses import replace

    with pytest.raises(CacheMismatch, match="resolution=64.*asks for 96.*--overwrite"):
        build_cache(replace(cfg, teacher=replace(spec, resolution=96)))
    with pytest.raises(CacheMismatch, match="weights_sha256"):
        build_cache(replace(cfg, teacher=replace(spec, weights=None)))
    with pytest.raises(CacheMismatch, match="top-4 logits, this build asks for top-5"):
        build_cache(replace(cfg, topk=5))
    assert build_cache(cfg)["num_samples"] == len(shards), "the same build again: complete, nothing to do"


@pytest.mark.s3
def test_build_into_s3(digits, object_store, s3_url: str) -> None:
    shards, weights = digits
    out = Location(s3_url, object_store.storage_options())
    info = build_cache(CacheBuildConfig(shards=shards.location, out=out, topk=3, workers=1,
                                        teacher=TeacherSpec("resnet10t", weights, 10, 64)))
    cache = TeacherCache(out, shards)
    assert cache.logits(np.array([0, 5, 9]), torch.tensor([[0.1, 0.1, 0.9, 0.9]] * 3)).shape == (3, 10)
    assert info["bytes_per_image"] == 2 * 2 * (3 * 2 + 3 * 2 + 2)


def test_build_killed_mid_way_then_rerun_gives_identical_output(digits, tmp_path: Path) -> None:
    """`teacher-cache build` SIGKILLed (with its Ray) after its first part file: the re-run keeps the parts
    already written and ends with the same bytes as an uninterrupted build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    shards0, weights = digits
    src = Path(shards0.location.url).parent / "digits"
    shards = Location(str(tmp_path / "shards"))
    build_shards(BuildConfig(src=str(src), dst=shards, shard_bytes=60_000, workers=1))
    assert len(ShardSet.open(shards, "train").shard_names) >= 8
    reference = build_cache(CacheBuildConfig(shards=shards, out=Location(str(tmp_path / "ref")), topk=4, workers=1,
                                             teacher=TeacherSpec("resnet10t", weights, 10, 32)))
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "teacher_cache.cli", "build", "--teacher", "resnet10t", "--weights", weights,
            "--num-classes", "10", "--shards", shards.url, "--out", str(out), "--resolution", "32", "--topk", "4",
            "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DISTILLERY_RAY_GCS_ADDRESS")}
    proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(out.glob("train-*.parquet")):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    written = sorted(p.name for p in out.glob("train-*.parquet"))
    assert not (out / "cache.json").exists() and written, "the kill came too late to test anything"
    kept = {name: (out / name).stat().st_mtime_ns for name in written}
    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {name: (out / name).stat().st_mtime_ns for name in written} == kept, "finished parts were redone"
    ref_files = sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files, "leftover temp files or missing parts"
    for name in ref_files:
        if name != "cache.json":
            assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    import json

    info = json.loads((out / "cache.json").read_text())
    assert {k: v for k, v in info.items() if k != "out"} == {k: v for k, v in reference.items() if k != "out"} | {
        "format": info["format"], "version": info["version"]}


def test_build_in_this_process_without_ray_writes_the_same_cache(digits, tmp_path: Path) -> None:
    """``workers=0`` (a single-GPU machine without Ray, the GPU benchmark): the same part files and
    cache.json, byte for byte, as the Ray actor build."""
    shards, weights = digits
    spec = TeacherSpec("resnet10t", weights, 10, 32)
    ray_info = build_cache(CacheBuildConfig(shards=shards.location, out=Location(str(tmp_path / "ray")), topk=4,
                                            workers=1, teacher=spec))
    local_info = build_cache(CacheBuildConfig(shards=shards.location, out=Location(str(tmp_path / "local")), topk=4,
                                              workers=0, teacher=spec))
    assert local_info == ray_info
    names = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == names
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name


def test_a_compiled_teacher_builds_the_same_cache(digits, tmp_path: Path) -> None:
    """``teacher-cache build --compile BACKEND``: the teacher's forward (replay caches) and feature map (map
    caches) compiled, the same outputs and the same cache as eager (aot_eager here: no C++ compiler needed)."""
    shards, weights = digits
    spec = TeacherSpec("resnet10t", weights, 10, 32)
    eager, compiled = Teacher(spec), Teacher(spec, compile="aot_eager")
    for n in (8, 8, 5):  # a shard's smaller last batch recompiles and still answers
        x = torch.randn(n, 3, 32, 32)
        assert torch.allclose(compiled.logits(x), eager.logits(x), atol=1e-5)
        assert torch.allclose(compiled.logit_map(x), eager.logit_map(x), atol=1e-5)
    assert compiled.identity == eager.identity
    from torch._dynamo.utils import counters

    graphs = []
    for backend in (None, "aot_eager"):
        counters.clear()
        build_cache(CacheBuildConfig(shards=shards.location, out=Location(str(tmp_path / str(backend))), topk=4,
                                     workers=0, teacher=spec, compile=backend))
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == 0 and graphs[1] > 0  # the build compiled its teacher only when asked
    rows = np.arange(len(shards))
    boxes = torch.tensor([[0.1, 0.2, 0.8, 0.7]]).repeat(len(rows), 1)
    built = [TeacherCache(Location(str(tmp_path / str(backend))), shards) for backend in (None, "aot_eager")]
    assert [c.info["build"].pop("compile") for c in built] == [["eager"], ["aot_eager"]]  # how, on record
    for c in built:
        c.info.pop("bytes")  # each part file records that word too
    assert built[0].info == built[1].info
    assert torch.allclose(built[1].logits(rows, boxes), built[0].logits(rows, boxes), atol=1e-3)


@pytest.mark.parametrize("data", ["digits", "mosaic"])
def test_bench_prints_agreement_by_crop_box_whole_image_and_replay_and_step_rates(data: str) -> None:
    """`teacher-cache bench` at toy size. Its teacher at 32 px has a 1 x 1 map (stride 32), which cannot
    tell crops apart: the crop-box and whole-image columns must then agree to the digit. A replayed crop is
    the online teacher's own input when the views are only cropped and flipped: 100% there."""
    import re

    from teacher_cache.bench import bench

    text = bench(teacher_steps=3, steps=2, size=16, resolution=32, batch=12, data=data)
    assert "(map 1x1, top-5)" in text and re.search(r"storage: \d+ bytes/image in memory", text)
    assert ("mosaic" in text.splitlines()[0]) == (data == "mosaic")
    for row in ("crops + flips only", "+ RandAugment, erasing", "+ Mixup/CutMix (DeiT)"):
        match = re.search(rf"^{re.escape(row)}" + r"\s+([\d.]+)%" * 5 + "$", text, re.M)
        assert match, row
        box, whole, replay, online_right, cache_right = map(float, match.groups())
        assert box == whole and all(0 <= v <= 100 for v in (box, replay, online_right, cache_right))
        assert replay == 100.0 or row != "crops + flips only", row
    for mode in ("none", "online", "cache"):
        assert re.search(rf"^{mode} teacher\s+\d+\s+[\d.]+$", text, re.M), mode


def test_one_decoding_graph_serves_every_shard_of_a_worker(digits) -> None:
    """A cache worker keeps one DALI graph from shard to shard (ShardGraph): the maps are those of a
    graph built for each shard, whatever the shards' order and sizes (last chunks smaller than a batch)."""
    from teacher_cache.build import ShardGraph, encode_shard

    shards, weights = digits
    spec = TeacherSpec("resnet10t", weights, 10, 32)
    cfg = CacheBuildConfig(shards=shards.location, out=Location("unused"), teacher=spec, topk=4, batch_size=48)
    teacher = Teacher(spec)
    order = sorted(shards.shard_names, reverse=True)
    assert len(order) >= 3 and any(int(shards.counts[s]) % 48 for s in order)
    shared = ShardGraph.for_teacher(teacher, cfg)
    for shard in [*order, order[0]]:  # and a shard again
        keys, maps, _ = encode_shard(shards, shard, teacher, cfg, shared)
        fresh_keys, fresh, _ = encode_shard(shards, shard, teacher, cfg)
        assert keys == fresh_keys and len(keys) == int(shards.counts[shard])
        for got, want in ((maps.indices, fresh.indices), (maps.values, fresh.values), (maps.floor, fresh.floor)):
            assert np.array_equal(got, want), shard
    assert shared.builds == 1  # reset from pass to pass, never built again
    broken = iter(shared([[np.frombuffer(b"not a jpeg", dtype=np.uint8)]]))
    with pytest.raises(Exception, match="(?i)decode|jpeg|image"):
        next(broken)
    keys, maps, _ = encode_shard(shards, order[1], teacher, cfg, shared)  # after a pass cut short: a new graph
    assert shared.builds == 2 and np.array_equal(maps.indices, encode_shard(shards, order[1], teacher, cfg)[1].indices)


def test_parts_are_read_once_while_they_fit_and_again_past_the_memory_budget(digits, tmp_path: Path) -> None:
    """A step's batch spans many shards (the stream reads several at once and shuffles them together): a
    cache that kept fewer parts than that re-read every part at every step. Within the budget each part is
    read once; past it (here: room for one) parts are read again, with the same logits."""
    shards, weights = digits
    out = Location(str(tmp_path / "cache"))
    build_cache(CacheBuildConfig(shards=shards.location, out=out, topk=4, workers=0,
                                 teacher=TeacherSpec("resnet10t", weights, 10, 32)))
    parts = len(shards.shard_names)
    assert parts >= 3
    rows = np.random.default_rng(0).permutation(len(shards))[:64]  # a shuffled batch over every shard
    spanned = len(np.unique(shards.shards[rows]))
    assert spanned == parts
    boxes = torch.rand(len(rows), 2).mul(0.5).repeat(1, 2) + torch.tensor([0.0, 0.0, 0.5, 0.5])
    roomy = TeacherCache(out, shards)
    first = roomy.logits(rows, boxes)
    assert torch.equal(roomy.logits(rows[::-1].copy(), boxes.flip(0)), first.flip(0))
    assert roomy.parts_read == parts, "every part once, whatever the order of the steps"
    tight = TeacherCache(out, shards, max_bytes_in_memory=1)
    assert torch.equal(tight.logits(rows, boxes), first) and torch.equal(tight.logits(rows, boxes), first)
    assert tight.parts_read == 2 * parts


def test_the_online_teachers_head_runs_in_fp32_under_autocast() -> None:
    """Under bf16 autocast (the trainer's step on a GPU; the CPU's autocast here) the body runs in bf16 and
    the head in fp32: fp32 logits, those of timm's head on the bf16 features, and no further from the
    all-fp32 teacher than timm's all-autocast forward, whose logits are rounded to bf16."""
    from teacher_cache.teacher import Fp32Head

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=1000).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain, ours, features = model(x), Fp32Head(model)(x), model.forward_features(x)
        expected = model.forward_head(features.float())
    assert plain.dtype == torch.bfloat16 and ours.dtype == torch.float32
    assert torch.equal(ours, expected)
    assert (ours - reference).abs().max() < (plain.float() - reference).abs().max()


def test_fixed_width_columns_read_whole_sliced_chunked_and_large_binary() -> None:
    """A part's binary columns straight from Arrow's buffers: the same values as joining the rows' bytes."""
    import pyarrow as pa

    from teacher_cache.cache import _fixed_width

    rows = [np.arange(i, i + 6, dtype=np.int16).tobytes() for i in range(10)]
    chunked = pa.Table.from_batches([pa.record_batch([pa.array(rows[:4], pa.binary())], names=["x"]),
                                     pa.record_batch([pa.array(rows[4:], pa.binary())], names=["x"])])
    cases = {"chunked": (chunked, rows), "sliced": (chunked.slice(3, 5), rows[3:8]),
             "large_binary": (pa.table({"x": pa.array(rows, pa.large_binary())}), rows),
             "empty": (chunked.slice(0, 0), [])}
    for case, (table, expected) in cases.items():
        assert np.array_equal(_fixed_width(table, "x", np.int16), np.frombuffer(b"".join(expected), np.int16)), case
