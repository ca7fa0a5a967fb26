"""Configuration of the data stages, as small frozen dataclasses that recipes fill in.

Defaults are DeiT's (DeiT paper, Table 9, and the timm customisations it names): RandAugment 9/0.5 as
timm's ``rand-m9-mstd0.5-inc1``, random erasing 0.25 in pixel mode, Mixup 0.8 / CutMix 1.0 switched with
probability 0.5, label smoothing 0.1, repeated augmentation x3, eval crop ratio 0.875. DeiT III's
3-Augment and CaiT's settings are other values of the same fields, set in ``trainer/recipes.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Per-view augmentation, run inside the DALI graph (train) or the eval transform."""

    image_size: int = 224
    crop: str = "rrc"  # "rrc": random resized crop; "simple": DeiT III's resize + random crop
    crop_pad: int = 4  # "simple" only: pixels of reflect padding around the resized image (DeiT III: 4)
    scale: tuple[float, float] = (0.08, 1.0)  # RRC area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RRC aspect ratio (sampled log-uniformly)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; None: off
    three_augment: bool = False  # DeiT III: one of grayscale / solarize / gaussian blur per image
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0: off (DeiT: off, RandAugment on)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    reprob: float = 0.25  # random erasing probability
    remode: str = "pixel"  # erased area filled with per-pixel normal noise
    recount: int = 1
    eval_crop_pct: float = 0.875  # eval: resize shorter side to image_size / crop_pct, centre crop
    eval_interpolation: str = "bicubic"
    # > 0: each view is one of this many crops fixed per image by (replay_seed, image), the crops a replay
    # teacher cache (`teacher-cache build --views R --seed S`) holds the teacher's outputs for; 0: fresh crops
    replay_views: int = 0
    replay_seed: int = 0

    def __post_init__(self) -> None:
        if self.crop not in ("rrc", "simple"):
            raise ValueError(f"augment.crop={self.crop!r}: use 'rrc' or 'simple'")
        if self.crop == "simple" and not 0 <= self.crop_pad < self.image_size // 2:
            raise ValueError(f"augment.crop_pad={self.crop_pad}: must be in [0, image_size / 2), e.g. 4")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"augment.scale={self.scale}: need 0 < min <= max <= 1, e.g. (0.08, 1.0)")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"augment.ratio={self.ratio}: need 0 < min <= max, e.g. (0.75, 1.333)")
        if not 0 < self.eval_crop_pct <= 1:
            raise ValueError(f"augment.eval_crop_pct={self.eval_crop_pct}: must be in (0, 1], e.g. 0.875")
        if not 0 <= self.replay_views < 1 << 20:
            raise ValueError(f"augment.replay_views={self.replay_views}: must be in [0, 2**20) (0: fresh crops)")
        for name in ("hflip", "reprob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augment.{name}={getattr(self, name)}: must be a probability in [0, 1]")


@dataclass(frozen=True)
class MixConfig:
    """Batch-level Mixup / CutMix with label smoothing (timm's Mixup semantics), applied on the GPU batch."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    label_smoothing: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class StreamConfig:
    """How shards become a stream of samples for one rank: order, repetition, buffering."""

    repeats: int = 3  # repeated augmentation: views per decoded image (1: off)
    shuffle_buffer: int = 5000  # sample-level shuffle buffer per loader worker
    seed: int = 0
    shard_cache_dir: str | None = None  # optional local folder that keeps fetched shards
    # Object-store reads are cut into requests of this many bytes; a failed request is retried from the
    # first chunk not yet received, so a dropped connection never re-reads what already arrived.
    read_chunk_bytes: int = 8 * 1024 * 1024
    max_read_retries: int = 5  # per chunk, with exponential backoff

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"stream.repeats={self.repeats}: must be >= 1 (1 turns repetition off)")
        if self.shuffle_buffer < 1:
            raise ValueError(f"stream.shuffle_buffer={self.shuffle_buffer}: must be >= 1")
        if self.read_chunk_bytes < 1:
            raise ValueError(f"stream.read_chunk_bytes={self.read_chunk_bytes}: must be >= 1, e.g. 8 MiB "
                             f"({8 * 1024 * 1024}); smaller chunks lose less on a dropped connection")
        if self.max_read_retries < 0:
            raise ValueError(f"stream.max_read_retries={self.max_read_retries}: must be >= 0 (0: no retries)")


@dataclass(frozen=True)
class DataConfig:
    """Everything the data side needs from a recipe."""

    train_url: str = ""
    val_url: str = ""
    # extra evaluation (DeiT Table 5's "ReaL" and "V2" columns): ReaL's real.json for the val split, and
    # ImageNet-V2 shards (split "val", built with --classes ["0", ..., "999"]); "": not evaluated
    real_labels: str = ""
    v2_url: str = ""
    batch_size: int = 1024  # global, in views (DeiT Table 9)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
