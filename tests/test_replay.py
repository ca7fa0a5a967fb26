"""The replay cache: R fixed crops per image, cut the same way by the cache's build and by every training
run, whose teacher outputs the cache holds exactly (issue 4's second design)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from pipeline.batch_aug import MixParams, normalize
from pipeline.build import BuildConfig, build_shards
from pipeline.config import AugmentConfig, DataConfig, MixConfig, StreamConfig
from pipeline.storage import Location
from pipeline.stream import ShardSet
from pipeline.views import draw_views, replayed_views
from tests.imagetree import make_tree


def test_a_replayed_view_depends_only_on_seed_image_and_view_and_is_drawn_as_fresh_views_are() -> None:
    cfg = AugmentConfig()
    n = 4000
    rows, ids = np.arange(n) // 8, np.arange(n) % 8
    widths, heights = 300 + rows % 7 * 40, 200 + rows % 5 * 50
    views = replayed_views(5, rows, ids, widths, heights, cfg)
    assert views.boxes.shape == (n, 1, 4) and views.flips.shape == (n, 1)
    pick = np.array([3999, 17, 2000, 5])  # alone, in another order, among others: the same views
    alone = replayed_views(5, rows[pick], ids[pick], widths[pick], heights[pick], cfg)
    assert np.array_equal(alone.boxes, views.boxes[pick]) and np.array_equal(alone.flips, views.flips[pick])
    other = replayed_views(6, rows, ids, widths, heights, cfg)
    assert not np.allclose(other.boxes, views.boxes)  # another seed, other crops
    assert len({tuple(b) for b in views.boxes[:8, 0]}) == 8  # an image's views differ
    fresh = draw_views(np.random.default_rng(0), widths, heights, 1, cfg)
    area = lambda v: ((v.boxes[..., 2] - v.boxes[..., 0]) * (v.boxes[..., 3] - v.boxes[..., 1])).ravel()  # noqa: E731
    for q in (10, 50, 90):  # the same random resized crop distribution as fresh draws
        assert abs(np.percentile(area(views), q) - np.percentile(area(fresh), q)) < 0.03, q
    assert abs(views.flips.mean() - 0.5) < 0.03
    simple = replayed_views(5, rows, ids, widths, heights, replace(cfg, crop="simple", image_size=32))
    outside = (simple.boxes[..., :2] < 0).any(-1) | (simple.boxes[..., 2:] > 1).any(-1)
    assert outside.mean() > 0.1  # DeiT III's padded crop, replayed: views reach into its 4 px of padding
    assert (simple.boxes[..., :2] >= -4 / 32 - 1e-6).all() and (simple.boxes[..., 2:] <= 1 + 4 / 32 + 1e-6).all()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardSet, str]:
    """Real JPEGs of many sizes and shapes, whose edges are not one colour (a crop reaching outside the
    image must be filled by reflection, as the loader fills it), and a teacher with random weights."""
    root = tmp_path_factory.mktemp("replay")
    make_tree(root / "images", num_classes=10, per_class=6, defects=False, size_range=(20, 80))
    build_shards(BuildConfig(src=str(root / "images"), dst=Location(str(root / "shards")), shard_bytes=20_000,
                             workers=1))
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), root / "teacher.pt")
    return ShardSet.open(Location(str(root / "shards")), "train"), str(root / "teacher.pt")


@pytest.mark.dali
@pytest.mark.parametrize("crop", ["rrc", "simple"])
def test_replay_cache_holds_the_teachers_output_on_each_crop_the_loader_replays(images, tmp_path: Path,
                                                                                crop: str) -> None:
    from pipeline.loader import TrainLoader
    from teacher_cache.build import CacheBuildConfig, build_cache
    from teacher_cache.cache import CacheMismatch, TeacherCache
    from teacher_cache.teacher import Teacher, TeacherSpec

    shards, weights = images
    spec = TeacherSpec("resnet10t", weights, 10, 32)
    augment = AugmentConfig(image_size=32, crop=crop, auto_augment=None, reprob=0.0, replay_views=5, replay_seed=3)
    cfg = CacheBuildConfig(shards=shards.location, out=Location(str(tmp_path / "cache")), teacher=spec, topk=10,
                           batch_size=40, workers=0, augment=augment, views=5, seed=3)
    info = build_cache(cfg)
    assert info["views"]["count"] == 5 and info["views"]["seed"] == 3 and info["views"]["crop"] == crop
    assert info["bytes_per_image"] == 5 * (10 * 4 + 2)  # top-10 (int16 + fp16) and a floor per crop
    teacher = Teacher(spec)
    cache = TeacherCache(cfg.out, shards, teacher.identity, augment=augment)
    data = DataConfig(batch_size=24, augment=augment, mix=MixConfig(prob=0.0), stream=StreamConfig(repeats=3))
    loader = TrainLoader(shards, data)
    batches = iter(loader)
    state = None
    seen = []
    for step in range(3):
        b = next(batches)
        assert b.view_ids is not None and len(b.view_ids) == len(b.rows) == 24
        for row in np.unique(b.rows):  # an image's 3 views in the step are 3 different crops of its 5
            ids = b.view_ids[b.rows == row]
            assert len(ids) == 3 and len(set(ids.tolist())) == 3 and ids.max() < 5
        online = teacher.logits(normalize(b.views, augment))  # the teacher on exactly the replayed crops
        cached = cache.logits(b.rows, b.boxes, view_ids=b.view_ids)
        # the same crops in the same float32 on a CPU: fp16 storage is the only error (all 10 classes kept)
        scale = online.abs().max().item()
        assert torch.allclose(cached, online, atol=1e-3 * scale, rtol=1e-3), (cached - online).abs().max()
        assert torch.equal(cached.argmax(1), online.argmax(1))
        with pytest.raises(ValueError, match="view_ids"):
            cache.logits(b.rows, b.boxes)
        seen.append(b.view_ids.copy())
        if step == 0:
            state = loader.state_dict()
    assert set(np.concatenate(seen).tolist()) == set(range(5))  # every fixed crop gets its turn
    resumed = iter(TrainLoader(shards, data, state=state))  # a resumed run replays the same crops
    assert np.array_equal(next(resumed).view_ids, seen[1])
    # a run that cuts other crops, or none, is refused, naming what to set
    with pytest.raises(CacheMismatch, match="replays 5 fixed crops.*replay_views=5 data.augment.replay_seed=3"):
        TeacherCache(cfg.out, shards, teacher.identity, augment=replace(augment, replay_views=0))
    with pytest.raises(CacheMismatch, match="seed=3.*augment.replay_seed=4"):
        TeacherCache(cfg.out, shards, teacher.identity, augment=replace(augment, replay_seed=4))
    cut = {"scale": (0.5, 1.0)} if crop == "rrc" else {"crop_pad": 2}  # a field that cuts this crop mode's crops
    with pytest.raises(CacheMismatch, match=f"{next(iter(cut))}=.*augment.{next(iter(cut))}="):
        TeacherCache(cfg.out, shards, teacher.identity, augment=replace(augment, **cut))
    with pytest.raises(CacheMismatch, match="std="):  # the teacher saw its crops normalised with other constants
        TeacherCache(cfg.out, shards, teacher.identity, augment=replace(augment, std=(0.5, 0.5, 0.5)))
    other_mode = {"crop_pad": 2} if crop == "rrc" else {"scale": (0.5, 1.0)}  # does not cut this mode's crops
    TeacherCache(cfg.out, shards, teacher.identity, augment=replace(augment, **other_mode))
    with pytest.raises(CacheMismatch, match="crop.*--overwrite"):
        build_cache(replace(cfg, seed=4))
    with pytest.raises(ValueError, match="replay_views=2 is fewer than stream.repeats=3"):
        TrainLoader(shards, replace(data, augment=replace(augment, replay_views=2)))
    # the trainer's wiring: the recipe's cache teacher looks crops up by the batch's view ids
    from trainer import recipes
    from trainer.overrides import apply_overrides
    from trainer.worker import build_teacher

    run = apply_overrides(recipes.get("demo_deit_tiny_distill"), [
        "distill.source=cache", f"distill.cache_url={cfg.out.url}", f"distill.teacher.pretrained_path={weights}",
        f"data.augment.crop={crop}", "data.augment.replay_views=5", "data.augment.replay_seed=3",
        "data.augment.scale=[0.08,1.0]", "data.augment.hflip=0.5"])
    cached_teacher, identity = build_teacher(run, torch.device("cpu"), shards)
    assert identity["teacher.cache"] == cfg.out.url
    assert torch.equal(cached_teacher(online, b, MixParams(1.0, None)), cached)
    with pytest.raises(CacheMismatch, match="replay_views=5"):
        build_teacher(apply_overrides(run, ["data.augment.replay_views=0"]), torch.device("cpu"), shards)
    stored = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert stored["version"] == 2 and stored["build"]["devices"] == ["cpu"]
    stored["views"]["algorithm"] = 0  # built by code that drew its crops another way
    (tmp_path / "cache" / "cache.json").write_text(json.dumps(stored))
    with pytest.raises(CacheMismatch, match="version 0 of the crop drawing.*rebuild"):
        TeacherCache(cfg.out, shards, teacher.identity, augment=augment)


@pytest.mark.dali
def test_a_map_cache_is_refused_to_a_run_that_replays_crops_and_kept_for_a_run_that_does_not(images,
                                                                                              tmp_path: Path) -> None:
    from teacher_cache.build import CacheBuildConfig, build_cache
    from teacher_cache.cache import CacheMismatch, TeacherCache
    from teacher_cache.teacher import TeacherSpec

    shards, weights = images
    cfg = CacheBuildConfig(shards=shards.location, out=Location(str(tmp_path / "maps")),
                           teacher=TeacherSpec("resnet10t", weights, 10, 32), topk=4, workers=0)
    assert build_cache(cfg)["views"] is None
    assert json.loads((tmp_path / "maps" / "cache.json").read_text())["version"] == 1  # older code reads it too
    TeacherCache(cfg.out, shards, augment=AugmentConfig(image_size=32))
    with pytest.raises(CacheMismatch, match="holds logit maps, this run replays crops"):
        TeacherCache(cfg.out, shards, augment=AugmentConfig(image_size=32, replay_views=4))
    with pytest.raises(CacheMismatch, match="--overwrite"):  # a replay build over a map cache
        build_cache(replace(cfg, views=4, augment=AugmentConfig(image_size=32)))
    with pytest.raises(ValueError, match="teacher resolution 64 must be the same"):
        replace(cfg, views=4, augment=AugmentConfig(image_size=32), teacher=TeacherSpec("resnet10t", weights, 10, 64))


@pytest.mark.dali
def test_the_command_builds_a_replay_cache_with_the_recipes_crops(images, tmp_path: Path, capsys, caplog) -> None:
    from teacher_cache.cache import read_info
    from teacher_cache.cli import main

    shards, weights = images
    base = ["build", "--teacher", "resnet10t", "--weights", weights, "--num-classes", "10", "--shards",
            shards.location.url, "--out", str(tmp_path / "cache"), "--workers", "0"]
    assert main([*base, "--views", "4"]) == 2  # which crops? the recipe must say
    assert "--views needs --recipe" in caplog.text
    assert main([*base, "--recipe", "demo_deit_tiny"]) == 2
    assert "pass --views N too" in caplog.text
    run = ["--recipe", "demo_deit_tiny", "--override", "data.augment.scale=[0.5,1.0]", "data.augment.replay_views=4",
           "data.augment.replay_seed=7"]
    assert main([*base, *run, "--views", "5"]) == 2
    assert "--views 5 contradicts the run's data.augment.replay_views=4" in caplog.text
    assert main([*base, *run, "--compile", "aot_eager"]) == 0  # count and seed from the run's own settings
    assert "4 replayed crops (seed 7) top-10" in capsys.readouterr().out
    views = read_info(Location(str(tmp_path / "cache")))["views"]
    assert views["count"] == 4 and views["seed"] == 7 and views["scale"] == [0.5, 1.0]
    assert views["image_size"] == 32  # the recipe's crop size, the teacher's resolution
    from teacher_cache.cli import build_parser

    assert build_parser().parse_args([*base, "--compile"]).compile == "inductor"  # the bare flag's backend
    assert build_parser().parse_args(base).compile is None


@pytest.mark.dali
def test_the_trainer_bench_builds_a_replay_cache_for_a_recipe_that_replays(images, tmp_path: Path) -> None:
    from teacher_cache.cache import TeacherCache
    from trainer import recipes
    from trainer.bench import _random_teacher_cache
    from trainer.overrides import apply_overrides

    shards, weights = images
    config = apply_overrides(recipes.get("demo_deit_tiny_distill"), ["data.augment.replay_views=3",
                                                                      "data.augment.replay_seed=2"])
    out = _random_teacher_cache(config, shards.location.url, weights, tmp_path / "cache", workers=0)
    cache = TeacherCache(Location(out), shards, augment=config.data.augment)  # the run's crops, or refused
    assert cache.views["count"] == 3 and cache.views["seed"] == 2
