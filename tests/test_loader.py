"""The train and eval loaders on real shards, through DALI's CPU operators (the GPU graph's twin)."""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.build import BuildConfig, build_shards
from pipeline.config import AugmentConfig, DataConfig, StreamConfig
from pipeline.loader import EvalLoader, TrainLoader, effective_batch, plan_batch
from pipeline.order import stream_rows
from pipeline.storage import Location
from pipeline.stream import SampleStream, ShardSet, StreamError
from tests.imagetree import make_tree

pytestmark = pytest.mark.dali
pytest.importorskip("nvidia.dali")

SIZE = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    root = tmp_path_factory.mktemp("loader")
    tree = make_tree(root / "src", num_classes=5, per_class=24, defects=False, size_range=(40, 90))
    build_shards(BuildConfig(src=str(tree.root), dst=Location(str(root / "dst")), shard_bytes=30_000, workers=1))
    return ShardSet.open(Location(str(root / "dst")), "train")


def _data(batch: int = 12, repeats: int = 3, window: int = 16, **augment) -> DataConfig:
    augment.setdefault("auto_augment", None)
    return DataConfig(batch_size=batch, augment=AugmentConfig(image_size=SIZE, **augment),
                      stream=StreamConfig(repeats=repeats, shuffle_buffer=window, seed=11))


def _take(loader: TrainLoader, steps: int) -> list:
    it = iter(loader)
    return [next(it) for _ in range(steps)]


def test_batches_hold_k_different_views_of_each_image_in_one_step(shards: ShardSet) -> None:
    loader = TrainLoader(shards, _data(batch=12, repeats=3), world=1)
    for batch in _take(loader, 4):
        assert batch.views.shape == (12, 3, SIZE, SIZE) and batch.views.dtype == torch.uint8
        assert batch.views.is_contiguous(memory_format=torch.channels_last)
        where: dict[str, list[int]] = {}
        for i, key in enumerate(batch.keys):
            where.setdefault(key, []).append(i)
        assert len(where) == 4 and all(len(v) == 3 for v in where.values()), "an image's 3 views in one step"
        for first, second, _ in where.values():
            assert batch.labels[first] == batch.labels[second]
            a, b = batch.views[first].float(), batch.views[second].float()
            assert (a - b).abs().mean() > 1.0, "views of one image are augmented independently"
        labels = {r: int(shards.labels[r]) for r in range(len(shards))}
        key_row = {k: r for r, k in enumerate(shards.keys)}
        assert batch.labels.tolist() == [labels[key_row[k]] for k in batch.keys]
        assert batch.boxes.min() >= 0 and batch.boxes.max() <= 1 and set(batch.flips.tolist()) <= {0, 1}


def test_the_views_of_one_image_meet_different_mixup_partners(shards: ShardSet) -> None:
    """Mixup/CutMix pairs view i with view N-1-i. Side by side, the 3 views of an image would always meet
    the 3 views of one other image; the loader shuffles a step's views (seeded) so that they do not, and
    boxes, flips, rows and labels follow the views."""
    loader = TrainLoader(shards, _data(batch=48, repeats=3), world=1)
    partners = []
    for batch in _take(loader, 3):
        n = len(batch.keys)
        by_key: dict[str, set[str]] = {}
        for i, key in enumerate(batch.keys):
            by_key.setdefault(key, set()).add(batch.keys[n - 1 - i])
        partners += [len(p) for p in by_key.values()]
        labels = {k: int(shards.labels[r]) for r, k in enumerate(shards.keys)}
        assert batch.labels.tolist() == [labels[k] for k in batch.keys]
        assert [shards.keys[r] for r in batch.rows] == batch.keys
    assert np.mean(partners) > 2.5, "most images' 3 views meet 3 different images"
    again, first = (_take(TrainLoader(shards, _data(batch=48, repeats=3), world=1), 1)[0] for _ in range(2))
    assert first.keys == again.keys and torch.equal(first.boxes, again.boxes), "the order is seeded"
    assert torch.equal(first.views, again.views)


def test_simple_crop_views_are_reflect_padded_where_they_reach_outside(shards: ShardSet) -> None:
    """DeiT III's simple crop through the loader: a view whose box starts above its image mirrors the
    rows below the edge into the padding (reflect, edge row not repeated)."""
    loader = TrainLoader(shards, _data(batch=12, repeats=3, crop="simple"), world=1)
    checked = 0
    for batch in _take(loader, 3):
        views = batch.views.permute(0, 2, 3, 1)  # [n, S, S, 3]
        for view, box in zip(views, batch.boxes, strict=True):
            pad = round(float(-box[0]) * SIZE / float(box[2] - box[0]))
            if pad > 0:
                assert torch.equal(view[:pad].flip(0), view[pad + 1:2 * pad + 1])
                checked += 1
    assert checked >= 3


def test_every_image_exactly_once_per_pass_and_k_views_each(shards: ShardSet) -> None:
    loader = TrainLoader(shards, _data(batch=12, repeats=3), world=1)
    images = len(shards)  # one pass: every image once -> 3 views each
    batches = _take(loader, images // 4)
    views = Counter(k for b in batches for k in b.keys)
    assert set(views) == set(shards.keys) and set(views.values()) == {3}
    # one epoch is N views (N/k images), as the papers count repeated-augmentation epochs
    assert loader.steps_per_epoch == len(shards) // 12
    # counted in the views a step really trains: 16 at x3 with Mixup is 4 images, 12 views, not 16
    assert TrainLoader(shards, _data(batch=16, repeats=3), world=1).steps_per_epoch == len(shards) // 12
    # an elastic run's epochs keep the nominal batch, whatever the group's size (its rounding varies)
    assert TrainLoader(shards, _data(batch=16, repeats=3), world=1, exact_batch=False).steps_per_epoch == len(
        shards) // 16


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_runs_the_same_steps_and_ranks_are_disjoint(shards: ShardSet, world: int) -> None:
    data = _data(batch=6 * world, repeats=3)
    loaders = [TrainLoader(shards, data, world=world, rank=r) for r in range(world)]
    assert len({(ld.steps_per_epoch, ld.images_per_step) for ld in loaders}) == 1
    per_rank_images = len(shards) // world
    steps = per_rank_images // loaders[0].images_per_step
    seen = []
    for ld in loaders:
        keys = [k for b in _take(ld, steps) for k in dict.fromkeys(b.keys)]  # each image once, in order
        assert len(keys) == steps * ld.images_per_step
        seen.extend(keys)
    assert len(seen) == len(set(seen)), "ranks read disjoint images within a pass"


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_resume_yields_exactly_the_next_samples_and_views(shards: ShardSet, cut: int) -> None:
    data = _data(batch=12, repeats=3, window=10)
    whole = _take(TrainLoader(shards, data, world=2, rank=1, threads=3), cut + 4)
    first = TrainLoader(shards, data, world=2, rank=1, threads=2)
    _take(first, cut)
    state = first.state_dict()
    assert state["step"] == cut
    resumed = _take(TrainLoader(shards, data, world=2, rank=1, threads=1, state=state), 4)
    for expected, got in zip(whole[cut:], resumed, strict=True):
        assert got.step == expected.step and got.keys == expected.keys
        assert torch.equal(got.boxes, expected.boxes) and torch.equal(got.flips, expected.flips)
        assert torch.equal(got.views, expected.views), "same samples, same boxes -> the same pixels on the CPU"


def test_state_from_another_dataset_or_seed_is_refused(shards: ShardSet) -> None:
    loader = TrainLoader(shards, _data(), world=1)
    state = loader.state_dict()
    bad = {**state, "stream": {**state["stream"], "seed": 99}}
    with pytest.raises(StreamError, match="seed=99"):
        TrainLoader(shards, _data(), world=1, state=bad)
    bad = {**state, "stream": {**state["stream"], "fingerprint": "0" * 64}}
    with pytest.raises(StreamError, match="fingerprint"):
        TrainLoader(shards, _data(), world=1, state=bad)


def test_batch_rounding_keeps_views_of_an_image_together() -> None:
    with pytest.raises(ValueError, match="not divisible by 3 workers"):
        plan_batch(16, 3, 1)
    with pytest.raises(ValueError, match="raise data.batch_size to at least 6"):
        plan_batch(4, 2, 3)
    assert plan_batch(1024, 8, 3) == 42  # DeiT: 128 views per GPU -> 42 images x 3 views
    assert effective_batch(1024, 8, 3) == 1008 and effective_batch(1024, 8, 1) == 1024


@pytest.mark.parametrize(("world", "images"), [(1, 340), (2, 170), (4, 84), (8, 42)])
def test_with_mixup_every_rank_gets_an_even_number_of_views(world: int, images: int) -> None:
    """timm's Mixup/CutMix pairs view i with N-1-i: DeiT's 1024 at x3 on 1 or 4 GPUs would be 1023 or 255
    views per rank; with mixing on they are rounded down to an even count, whole images still."""
    assert plan_batch(1024, world, 3, even=True) == images
    assert images * 3 % 2 == 0 and effective_batch(1024, world, 3, even=True) == images * 3 * world
    assert plan_batch(1024, world, 3) in (images, images + 1)  # without mixing no even rule
    with pytest.raises(ValueError, match="an even number of views for Mixup/CutMix.*at least 12"):
        plan_batch(10, 2, 3, even=True)


def test_corrupt_member_is_skipped_counted_and_replaced(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", num_classes=3, per_class=10, defects=False)
    dst = tmp_path / "dst"
    build_shards(BuildConfig(src=str(tree.root), dst=Location(str(dst)), shard_bytes=40_000, workers=1))
    shards = ShardSet.open(Location(str(dst)), "train")
    victim = 4
    shard_path = dst / shards.shard_names[int(shards.shards[victim])]
    data = bytearray(shard_path.read_bytes())
    start = int(shards.offsets[victim])
    data[start:start + 2] = b"\0\0"  # no JPEG start marker any more
    shard_path.write_bytes(bytes(data))
    stream = SampleStream(shards, StreamConfig(shuffle_buffer=8, seed=1), threads=2)
    samples = stream.take(len(shards))
    assert len(samples) == len(shards), "the rank still yields its planned count"
    assert shards.keys[victim] not in {s.key for s in samples}
    # counted each time it is fetched: once per pass, and read-ahead may already be into the next pass
    m = stream.metrics
    assert m.corrupt_samples >= 1 and m.substituted == m.corrupt_samples
    assert m.reasons == {"corrupt JPEG": m.corrupt_samples}
    assert m.corrupt_samples <= -(-m.fetched // len(shards)), "at most once per pass fetched"


def test_threads_never_change_the_order(shards: ShardSet) -> None:
    cfg = StreamConfig(shuffle_buffer=7, seed=5)
    one = [s.row for s in SampleStream(shards, cfg, world=2, rank=0, threads=1).take(150)]
    four = [s.row for s in SampleStream(shards, cfg, world=2, rank=0, threads=4).take(150)]
    assert one == four == stream_rows(shards.counts, 5, 2, 0, 7, 0, 150).tolist()


def test_shard_cache_serves_the_second_read(shards: ShardSet, tmp_path: Path) -> None:
    cfg = StreamConfig(shuffle_buffer=9, shard_cache_dir=str(tmp_path / "cache"))
    first = SampleStream(shards, cfg, threads=2)
    rows = [s.row for s in first.take(60)]
    cached = list((tmp_path / "cache").rglob("*.tar"))
    assert cached and all(p.stat().st_size > 0 for p in cached)
    again = SampleStream(shards, cfg, threads=2)
    assert [s.row for s in again.take(60)] == rows


@pytest.mark.parametrize("world", [1, 3])
def test_eval_reads_every_sample_once_with_timm_resize_and_centre_crop(shards: ShardSet, world: int) -> None:
    data = _data()
    keys = []
    for rank in range(world):
        for images, labels, batch_keys in EvalLoader(shards, data, batch_size=16, world=world, rank=rank):
            assert images.shape[1:] == (3, SIZE, SIZE) and len(labels) == len(batch_keys)
            keys.extend(batch_keys)
    assert sorted(keys) == sorted(shards.keys)


@pytest.mark.parametrize("torch_resize", [True, False])
def test_eval_transform_matches_pil_resize_and_centre_crop(shards: ShardSet, torch_resize: bool) -> None:
    """timm's eval transform (torchvision's Resize + CenterCrop on PIL), through DALI's operators (the GPU's
    graph) and through torch's resize (the CPU's, `pipeline.host_resize`: the same sizes and offsets as
    torchvision's, so only rounding and the JPEG decoders differ)."""
    import torchvision.transforms as T

    data = _data()
    loader = EvalLoader(shards, data, batch_size=8, torch_resize=torch_resize)
    images, _, keys = next(iter(loader))
    key_row = {k: r for r, k in enumerate(shards.keys)}
    reference = T.Compose([T.Resize(int(SIZE / 0.875), interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(SIZE)])
    for image, key in zip(images, keys, strict=True):
        shard = int(shards.shards[key_row[key]])
        sample = loader.pieces.read(shard, 0, int(shards.counts[shard]))
        data_bytes = sample[key_row[key]].data
        expected = np.asarray(reference(Image.open(io.BytesIO(data_bytes)).convert("RGB")), dtype=np.float32)
        got = image.permute(1, 2, 0).numpy().astype(np.float32)
        diff = np.abs(got - expected)
        if torch_resize:  # 1 level at most here, 0.01 on average
            assert diff.mean() < 0.05 and diff.max() <= 2, (diff.mean(), diff.max())
        else:  # DALI rounds the longer side and the crop's offset its own way: a pixel's shift, ~1-4 levels
            assert diff.mean() < 4.0


def test_an_elastic_resize_resumes_at_the_next_pass_of_the_new_worker_count(shards: ShardSet) -> None:
    from pipeline.loader import state_for_world
    from pipeline.order import per_rank

    data = _data(batch=12, repeats=1)
    states = {}
    for rank in range(2):  # 2 workers, 3 steps of 6 images each, then the group grows to 3
        loader = TrainLoader(shards, data, world=2, rank=rank, threads=2, dali_threads=1)
        _take(loader, 3)
        states[str(rank)] = loader.state_dict()
    per2, per3 = per_rank(shards.counts, 2), per_rank(shards.counts, 3)
    assert states["0"]["stream"]["position"] == 18 < per2
    new = state_for_world(states, shards, world=3, rank=1)
    assert new["step"] == 3 and (new["stream"]["world"], new["stream"]["rank"]) == (3, 1)
    assert new["stream"]["position"] == per3, "pass 0 was interrupted: rank 1 of 3 starts pass 1"
    resumed = TrainLoader(shards, data, world=3, rank=1, threads=2, dali_threads=1, state=new)
    batch = _take(resumed, 1)[0]
    assert batch.step == 3
    expected = SampleStream(shards, data.stream, world=3, rank=1, position=per3).take(4)
    assert batch.keys == [s.key for s in expected]
    # a pass that had just ended is not skipped; a fresh run stays at the start
    for position, pass_index in ((per2, 1), (2 * per2, 2), (0, 0)):
        done = {str(r): {**states[str(r)], "stream": {**states[str(r)]["stream"], "position": position}}
                for r in range(2)}
        assert state_for_world(done, shards, world=1, rank=0)["stream"]["position"] == pass_index * per_rank(
            shards.counts, 1)
    assert plan_batch(12, 5, 1, exact=False) == 2 and effective_batch(12, 5, 1, exact=False) == 10
    with pytest.raises(ValueError, match="not divisible"):
        plan_batch(12, 5, 1)


def test_graphs_on_a_gpu_hand_their_outputs_over_on_torchs_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_graph` asks DALI for stream-ordered outputs on torch's current stream of the graph's GPU (the
    copy out then waits on the GPU, not on the host), and for the plain host-synchronous run on a CPU."""
    from pipeline import dali_graph

    asked: list[tuple] = []

    class Pipe:
        def run(self, *stream):
            asked.append(stream)
            return ("views", "labels")

    streams = {}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams.setdefault(device, object()))
    assert dali_graph.run_graph(Pipe(), None) == ("views", "labels")
    assert dali_graph.run_graph(Pipe(), 1) == ("views", "labels")
    assert asked == [(), (streams[1],)]


def test_a_bare_cuda_device_is_torchs_current_gpu_for_dali(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders allocate their outputs on ``device``; DALI must run on that same GPU: for a bare "cuda",
    torch's current one (a worker that set another), not GPU 0."""
    from pipeline.dali_graph import device_id_of

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert device_id_of("cpu") is None and device_id_of(torch.device("cpu")) is None
    assert device_id_of("cuda") == 3 and device_id_of("cuda:1") == 1 and device_id_of(torch.device("cuda", 0)) == 0


def test_every_loader_and_the_cache_build_run_their_graphs_through_run_graph(
        shards: ShardSet, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders and the cache build's graph run DALI through `run_graph` with their graph's device (on a
    GPU a plain ``pipe.run()`` is the host-synchronous run, which stalls the host behind the queued step)."""
    from pipeline import dali_graph, loader
    from teacher_cache import build

    seen: list[int | None] = []

    def spy(pipe, device_id):
        seen.append(device_id)
        return dali_graph.run_graph(pipe, device_id)

    monkeypatch.setattr(loader, "run_graph", spy)
    monkeypatch.setattr(build, "run_graph", spy)
    next(iter(TrainLoader(shards, _data(), device="cpu")))
    next(iter(EvalLoader(shards, _data(), batch_size=8, device="cpu")))
    samples = SampleStream(shards, StreamConfig(shuffle_buffer=4), threads=1).take(4)
    graph = build.ShardGraph(lambda source: dali_graph.whole_image_graph(source, 4, SIZE, None, 1), None)
    feeds = [[np.frombuffer(x.data, dtype=np.uint8) for x in samples]]
    assert len(list(graph(feeds))) == 1
    assert seen == [None, None, None]

    class OnSecondGpu:  # what for_teacher reads of a teacher; the graph itself is never built here
        device = torch.device("cuda", 1)
        spec = build.TeacherSpec("resnet10t", None, 10, SIZE)

    config = build.CacheBuildConfig(shards=shards.location, out=shards.location, teacher=OnSecondGpu.spec)
    assert build.ShardGraph.for_teacher(OnSecondGpu(), config)._device_id == 1
    replay = replace(config, views=4, augment=AugmentConfig(image_size=SIZE))
    assert build.ShardGraph.for_teacher(OnSecondGpu(), replay)._device_id == 1
