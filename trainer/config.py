"""The trainer's configuration: small frozen dataclasses, one per component, under one ``TrainConfig``.

A run is a *function that returns a complete* ``TrainConfig`` (``trainer/recipes.py``); variants derive
from a base with ``dataclasses.replace``; command-line ``key=value`` overrides go through
``trainer/overrides.py``. The data side (``DataConfig`` and its augment / mix / stream parts) is
``pipeline.config``'s, reused here, not copied.

Defaults are DeiT-S as trained in the DeiT paper (Table 9 of arXiv 2012.12877 / Table 3.9 of Touvron's
thesis), so a default ``TrainConfig()`` is a sensible, complete run; every recipe nevertheless spells out
its own numbers with their table. Numbers that no table of the papers gives (AdamW's betas and eps, the
warmup and floor learning rates, EMA decay) are the defaults of the code released with the papers,
``facebookresearch/deit`` ``main.py``, and say so where they stand.

Validation lives in one place, :meth:`TrainConfig.validate`, which checks every field and every
cross-field rule at once and raises one :class:`ConfigError` listing each problem with the field's dotted
name and the fix. Constructing a config never raises for trainer fields (the pipeline's own dataclasses
check their fields on construction, see ``pipeline/config.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import DataConfig

__all__ = [
    "ConfigError",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "DistillConfig",
    "LossConfig",
    "EMAConfig",
    "CheckpointConfig",
    "TrackingConfig",
    "ScalingConfig",
    "RuntimeConfig",
    "TrainConfig",
    "OPTIMIZERS",
    "DISTILL_KINDS",
    "TEACHER_SOURCES",
    "LOSS_BASES",
    "REGNETY_160_URL",
    "to_dict",
]

OptimizerName = Literal["adamw", "lamb", "sgd"]
DistillKind = Literal["none", "soft", "hard"]
TeacherSource = Literal["cache", "online", "remote"]
LossBase = Literal["ce", "bce"]
TalkingHeads = Literal["timm", "sdpa"]
CompileScope = Literal["model", "blocks", "auto"]

OPTIMIZERS: tuple[str, ...] = ("adamw", "lamb", "sgd")
DISTILL_KINDS: tuple[str, ...] = ("none", "soft", "hard")
TEACHER_SOURCES: tuple[str, ...] = ("cache", "online", "remote")
LOSS_BASES: tuple[str, ...] = ("ce", "bce")

# The RegNetY-16GF teacher of DeiT sec. 5.2 ("the default teacher is a RegNetY-16GF ... 82.9% top-1"),
# as released with the DeiT code (facebookresearch/deit README_deit.md, hard-distillation command).
REGNETY_160_URL = "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"

# timm families that take ``img_size`` (patch-based: the position embedding / token mixing depends on
# it); convnets (resnet, regnet) are resolution-agnostic and reject the keyword.
_PATCH_FAMILIES = ("vit_", "deit", "cait_", "resmlp_")
# ModelConfig.talking_heads: the implementations of CaiT's attention ("sdpa": trainer.talking_heads)
TALKING_HEADS: tuple[str, ...] = ("timm", "sdpa")
COMPILE_SCOPES: tuple[str, ...] = ("model", "blocks", "auto")  # RuntimeConfig.compile_scope
# A pretrained checkpoint is a file (local path or URL), never a model-hub download.
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "hf://", "timm/")


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem as ``field: what is wrong; the fix``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class ModelConfig:
    """A timm model and the few constructor arguments the recipes set.

    Used for the student (``TrainConfig.model``) and for the teacher (``DistillConfig.teacher``).
    :meth:`build` makes the timm model; weights come from ``pretrained_path`` (a local file or a URL,
    loaded by the trainer), never from a model hub.
    """

    name: str = "deit_small_patch16_224"  # timm model name (DeiT Table 1: DeiT-S)
    num_classes: int = 1000  # ImageNet-1k
    img_size: int = 224  # training resolution (DeiT Table 1)
    drop_path: float = 0.1  # stochastic depth rate (DeiT Table 9)
    # How the rate is spread over the blocks. False: timm's ViT rule, a linear increase from 0 at the first
    # block to drop_path at the last (what DeiT trained with: its models build on timm's ViT). True: the
    # same rate in every block, "uniform stochastic depth" (CaiT sec. 4.3, DeiT III thesis sec. 6.2.1);
    # timm's CaiT and ResMLP are uniform by construction.
    drop_path_uniform: bool = False
    drop_rate: float = 0.0  # dropout before the head (DeiT Table 9: no dropout)
    layer_scale_init: float | None = None  # LayerScale epsilon (CaiT eq. 3); None: the model has none
    distilled: bool = False  # has DeiT's distillation token + second head (timm *_distilled_* models)
    pretrained_path: str | None = None  # checkpoint file to start from (path or URL); None: random init
    # Architecture overrides passed to timm.create_model (None: the named model's own). Only the tiny
    # CPU demo recipes use them, e.g. a 2-block DeiT-Ti on 32x32 images with 4x4 patches.
    patch_size: int | None = None
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    # CaiT's talking-heads attention: "timm" (timm's TalkingHeadAttn, five passes over B x H x N x N) or
    # "sdpa" (the same function through one fused attention call, trainer.talking_heads; same parameters).
    talking_heads: TalkingHeads = "timm"

    @property
    def is_patch_model(self) -> bool:
        """True for the patch-based families (ViT/DeiT/CaiT/ResMLP), whose timm constructors take img_size."""
        return self.name.startswith(_PATCH_FAMILIES)

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``timm.create_model(self.name, **kwargs)`` (always ``pretrained=False``).

        LayerScale goes in as ``init_values`` for ViT / DeiT III / CaiT; timm's ResMLP constructors do not
        take it as a keyword (they fix ``block_layer``), so :meth:`build` sets it after construction.
        """
        kwargs: dict[str, Any] = {
            "pretrained": False,
            "num_classes": self.num_classes,
            "drop_rate": self.drop_rate,
            "drop_path_rate": self.drop_path,
        }
        if self.is_patch_model:
            kwargs["img_size"] = self.img_size
        for name in ("patch_size", "depth", "embed_dim", "num_heads"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.layer_scale_init is not None and not self.name.startswith("resmlp_"):
            kwargs["init_values"] = self.layer_scale_init
        return kwargs

    def build(self) -> Any:
        """A freshly initialised timm model (``torch.nn.Module``) with this config's numbers.

        ``timm.create_model(name, **timm_kwargs())``, then ``drop_path_uniform`` (timm's ViT only has the
        linear rule: each block's DropPath is replaced by one at ``drop_path``), then ResMLP's LayerScale
        init, which timm only takes
        through its block class: the ``ls1``/``ls2`` vectors of every block are filled with
        ``layer_scale_init`` (what ``ResBlock(init_values=...)`` does). ``pretrained_path`` is not loaded
        here: the trainer loads it (with position-embedding interpolation when the resolution changes,
        DeiT sec. 3). timm and torch are imported lazily so that configs stay importable without them.
        """
        import timm
        import torch

        model = timm.create_model(self.name, **self.timm_kwargs())
        if self.drop_path_uniform:  # timm's ViT blocks get the linear rule; make every block's rate equal
            from timm.layers import DropPath

            for block in getattr(model, "blocks", []):
                for attr in ("drop_path1", "drop_path2"):
                    if hasattr(block, attr):
                        layer = DropPath(self.drop_path) if self.drop_path > 0 else torch.nn.Identity()
                        setattr(block, attr, layer)
        if self.name.startswith("resmlp_") and self.layer_scale_init is not None:
            with torch.no_grad():
                for block in model.blocks:
                    block.ls1.fill_(self.layer_scale_init)
                    block.ls2.fill_(self.layer_scale_init)
        if self.talking_heads == "sdpa":
            from trainer.talking_heads import use_sdpa_talking_heads

            if not use_sdpa_talking_heads(model):
                raise ConfigError([f"talking_heads='sdpa' but {self.name!r} has no talking-heads attention "
                                   "(timm's TalkingHeadAttn, CaiT's): set talking_heads=timm"])
        return model


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and the learning-rate scaling rule.

    The peak learning rate is ``lr * global_batch / lr_batch_size`` when ``scale_lr`` (DeiT sec. 6:
    "lr_scaled = lr / 512 x batchsize", i.e. ``lr_batch_size=512``), else ``lr`` as given. Recipes
    quote a paper's learning rate at the batch size the paper states it for (CaiT: 1e-3 at 1024), so
    the number in the recipe is the number in the table.
    """

    name: OptimizerName = "adamw"  # DeiT Table 9
    lr: float = 5e-4  # DeiT Table 9: 0.0005 x batchsize / 512
    lr_batch_size: int = 512  # the batch size ``lr`` is quoted for (DeiT sec. 6: 512)
    scale_lr: bool = True  # linear scaling with the global batch (DeiT sec. 6)
    weight_decay: float = 0.05  # DeiT Table 9
    # Not in the papers' tables: torch.optim.AdamW's default betas, as DeiT's code leaves --opt-betas
    # unset; eps is DeiT main.py's --opt-eps default 1e-8 (passed to LAMB too).
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # SGD only (DeiT main.py default)
    clip_grad: float | None = None  # max global grad norm; None: no clipping (DeiT Table 9: no clipping)
    # timm's rule (create_optimizer_v2 filter_bias_and_bn): no weight decay on 1-D parameters (norm
    # weights, biases, LayerScale gammas) nor on the model's no_weight_decay() set (pos_embed,
    # cls_token, dist_token).
    no_weight_decay_1d_and_tokens: bool = True
    # Not in the papers: each step's batch run as this many forward/backward passes, gradients summed
    # before the one update (DDP syncs on the last), so DeiT-B's 1024 fits one GPU with the same update.
    micro_batches: int = 1

    def peak_lr(self, global_batch: int) -> float:
        """The learning rate reached after warmup for a global batch of ``global_batch`` samples."""
        if not self.scale_lr:
            return self.lr
        return self.lr * global_batch / self.lr_batch_size


@dataclass(frozen=True)
class ScheduleConfig:
    """Epochs and the learning-rate curve: linear warmup from ``warmup_lr``, then cosine to ``min_lr``."""

    epochs: int = 300  # DeiT Table 9
    warmup_epochs: int = 5  # DeiT Table 9
    # Not in the papers' tables: DeiT main.py defaults (--warmup-lr 1e-6, --min-lr 1e-5).
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cosine: bool = True  # DeiT Table 9 "learning rate decay: cosine"; False: constant after warmup
    # DeiT's code steps timm's scheduler once per epoch; we update every optimizer step (the same curve,
    # sampled finer). False reproduces the reference code's staircase exactly.
    per_step: bool = True


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation: which loss term, which teacher, and where its outputs come from.

    * ``kind="soft"``: DeiT eq. 2, ``(1 - alpha) CE(y) + alpha tau^2 KL``, with tau=3.0, lambda=0.1
      (DeiT sec. 6). ``kind="hard"``: DeiT eq. 3, ``1/2 CE(y) + 1/2 CE(argmax teacher)``; the halves are
      fixed by the equation, ``tau`` and ``alpha`` are unused. With ``model.distilled`` the teacher term
      goes to the distillation head, otherwise (CaiT, ResMLP) to the single head.
    * ``teacher``: a ``ModelConfig``; its ``img_size`` is the teacher's resolution and its
      ``pretrained_path`` the teacher's weights (file or URL).
    * ``source``: ``"online"`` runs the teacher on the student's (mixed) batch, as the paper does;
      ``"cache"`` reads precomputed teacher outputs (``teacher_cache/``); ``"remote"`` runs the online
      teacher in ``remote_actors`` Ray actors on other GPUs (same labels, off the student's GPU).
    """

    kind: DistillKind = "none"
    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(name="regnety_160", drop_path=0.0, pretrained_path=REGNETY_160_URL)
    )  # DeiT sec. 5.2: RegNetY-16GF
    tau: float = 3.0  # DeiT sec. 6 (released code default: 1.0; we follow the paper)
    alpha: float = 0.1  # lambda of DeiT eq. 2, sec. 6 (released code default: 0.5; we follow the paper)
    source: TeacherSource = "online"
    cache_url: str = ""  # with source="cache": the folder `teacher-cache build --out` wrote
    # with source="remote": the online teacher in this many Ray actors (a GPU each when scaling.use_gpu),
    # shared by the run's workers, fed one step ahead (`trainer.remote_teacher`)
    remote_actors: int = 1
    # torch.compile the online teacher (source=online, and each remote actor's) with runtime.compile_backend;
    # a cache's teacher does not run in training (compile its build: `teacher-cache build --compile`)
    compile_teacher: bool = False


@dataclass(frozen=True)
class LossConfig:
    """The true-label term: cross-entropy (DeiT, CaiT) or binary cross-entropy (DeiT III)."""

    base: LossBase = "ce"
    # With BCE, binarize the (mixed) targets to ``target > threshold``; DeiT III's released engine.py uses
    # ``targets.gt(0.0)``. None keeps the targets soft.
    bce_target_threshold: float | None = None


@dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the weights.

    DeiT's released code turns EMA on (``--model-ema``, decay 0.99996), but the paper's default
    training leaves it off (DeiT Table 7/8 first row: EMA ✗; sec. 6: "small gains, which vanish after
    fine-tuning"). We follow the paper: off; the decay is the code's, for runs that turn it on.
    """

    enabled: bool = False
    decay: float = 0.99996


@dataclass(frozen=True)
class CheckpointConfig:
    """When to write checkpoints and how many to keep."""

    every_n_steps: int = 1000
    keep: int = 3
    # write (serialise, fsync, Ray's copy to storage, Ray's commit) on a background thread: the training
    # thread only copies the state to host memory (trainer.background); false: all on the training thread
    background: bool = True
    url: str = ""  # fsspec folder URL; "": the run's own folder chosen by the trainer


@dataclass(frozen=True)
class TrackingConfig:
    """Metrics logging (MLflow)."""

    log_every_n_steps: int = 50
    experiment: str = "distillery"
    run_name: str = ""  # "": the recipe's name
    tracking_uri: str = ""  # "": MLflow's default (./mlruns)
    # MLflow's system metrics (CPU, memory, disk, network; GPUs through NVML) from rank 0's node every
    # this many seconds; 0 turns them off
    system_metrics_every_s: float = 10.0


@dataclass(frozen=True)
class ScalingConfig:
    """How many training workers (one per GPU, Ray Train) and whether they use GPUs."""

    num_workers: int = 8  # DeiT sec. 1: a single 8-GPU node
    use_gpu: bool = True
    # 0: a fixed group of num_workers. k >= 1: elastic, Ray Train runs between k and num_workers workers
    # (ScalingConfig(num_workers=(k, num_workers))), starting with what it can get and resizing on failures
    # or new nodes. A resized group resumes at the next pass of its own sample order (`state_for_world`),
    # and a global batch the worker count does not divide is rounded down per worker (lr follows it).
    min_workers: int = 0


@dataclass(frozen=True)
class RuntimeConfig:
    """Numerics and kernels of the training step; none of these change the recipe's mathematics."""

    bf16: bool = True  # autocast to bfloat16 (the loss runs in fp32, see trainer/losses.py)
    compile: bool = False  # torch.compile the student
    # torch.compile's backend: "inductor" (generated kernels); "aot_eager" traces and runs the same graph
    # without code generation (the tests' CPU check of the compiled path); "cudagraphs", ...
    compile_backend: str = "inductor"
    # What one torch.compile covers: "model", the whole student (one graph: the most fusion, the longest
    # compile); "blocks", each transformer block in place, compiled once and reused by its identical
    # siblings (the patch embedding and head run eager); "auto", blocks when the blocks are identical
    # (CaiT, DeiT III: uniform drop path), else the model (DeiT's drop-path rate differs block by block)
    compile_scope: CompileScope = "model"
    channels_last: bool = False  # the student's NHWC memory format (helps convnets, not ViTs); a teacher runs
    # NHWC on a GPU whatever this says, and also off one when this is set
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """A complete run: what to train, on which data, how, and where its outputs go."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def peak_lr(self) -> float:
        """The learning rate after warmup, for this run's global batch (``data.batch_size``)."""
        return self.optim.peak_lr(self.data.batch_size)

    @property
    def per_worker_batch(self) -> int:
        """Samples (views) per worker per step: ``data.batch_size / scaling.num_workers``."""
        return self.data.batch_size // max(self.scaling.num_workers, 1)

    def validate(self, strict: bool = False) -> TrainConfig:
        """Check every field and cross-field rule; raise one ``ConfigError`` listing all problems.

        ``strict=True`` also requires what only a real run needs (data URLs, teacher weights), so that
        recipes, which leave the data location to the command line, validate without it. Returns
        ``self`` so that ``cfg = recipe().validate()`` reads naturally.
        """
        problems = _problems(self)
        if strict:
            problems += _strict_problems(self)
        if problems:
            raise ConfigError(problems)
        return self


def to_dict(config: Any) -> dict[str, Any]:
    """A nested plain dict of a config (tuples become lists), e.g. for JSON output."""
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------------
# Validation: each helper returns "field: problem; fix" strings; TrainConfig.validate joins them.


def _problems(c: TrainConfig) -> list[str]:
    return [
        *_model_problems(c.model, "model"),
        *_data_problems(c),
        *_optim_problems(c),
        *_schedule_problems(c),
        *_distill_problems(c),
        *_misc_problems(c),
    ]


def _model_problems(m: ModelConfig, at: str) -> list[str]:
    out = []
    if not m.name:
        out.append(f"{at}.name is empty: give a timm model name, e.g. deit_small_patch16_224")
    if m.num_classes < 1:
        out.append(f"{at}.num_classes={m.num_classes}: must be >= 1 (ImageNet-1k: 1000)")
    if m.img_size < 1:
        out.append(f"{at}.img_size={m.img_size}: must be a positive resolution, e.g. 224")
    for name in ("drop_path", "drop_rate"):
        value = getattr(m, name)
        if not 0.0 <= value < 1.0:
            out.append(f"{at}.{name}={value}: must be in [0, 1), e.g. 0.1")
    if m.layer_scale_init is not None and not m.layer_scale_init > 0:
        out.append(f"{at}.layer_scale_init={m.layer_scale_init}: must be > 0 (e.g. 1e-5) or None")
    for name in ("patch_size", "depth", "embed_dim", "num_heads"):
        value = getattr(m, name)
        if value is not None and value < 1:
            out.append(f"{at}.{name}={value}: must be >= 1, or None for the model's own")
    if m.name.startswith(("cait_", "resmlp_")) and not m.drop_path_uniform:
        out.append(
            f"{at}.drop_path_uniform=False but timm's CaiT/ResMLP apply one rate to every block: set "
            f"{at}.drop_path_uniform=true (what the model does anyway)"
        )
    overrides = [n for n in ("patch_size", "depth", "embed_dim", "num_heads") if getattr(m, n) is not None]
    if m.name.startswith("resmlp_") and overrides:
        out.append(
            f"{at}.{overrides[0]} is set but timm's ResMLP constructors fix their architecture: set "
            f"{', '.join(f'{at}.{n}' for n in overrides)} to none, or pick another resmlp_* model"
        )
    if m.patch_size is not None and m.img_size % m.patch_size:
        out.append(f"{at}.patch_size={m.patch_size} does not divide {at}.img_size={m.img_size}: pick a divisor")
    if m.embed_dim is not None and m.num_heads is not None and m.embed_dim % m.num_heads:
        out.append(f"{at}.embed_dim={m.embed_dim} is not divisible by {at}.num_heads={m.num_heads}")
    if m.talking_heads not in TALKING_HEADS:
        out.append(f"{at}.talking_heads={m.talking_heads!r}: must be one of {', '.join(TALKING_HEADS)}")
    elif m.talking_heads != "timm" and not m.name.startswith("cait_"):
        out.append(f"{at}.talking_heads={m.talking_heads!r} but {at}.name={m.name!r} is not a CaiT (only CaiT has "
                   f"talking-heads attention): set {at}.talking_heads=timm")
    has_token = "distilled" in m.name
    if m.distilled and not has_token:
        out.append(
            f"{at}.distilled=True but {at}.name={m.name!r} has no distillation token: use a timm "
            "*_distilled_* model (e.g. deit_small_distilled_patch16_224) or set distilled=False"
        )
    if has_token and not m.distilled:
        out.append(f"{at}.name={m.name!r} has a distillation token: set {at}.distilled=True")
    if m.pretrained_path is not None:
        if not m.pretrained_path:
            out.append(f"{at}.pretrained_path is empty: give a checkpoint path or URL, or None")
        elif m.pretrained_path.startswith(_HUB_PREFIXES):
            out.append(
                f"{at}.pretrained_path={m.pretrained_path!r} is a model-hub name: give a local file or a "
                "URL of a checkpoint file (weights are never downloaded from a hub)"
            )
    return out


def _data_problems(c: TrainConfig) -> list[str]:
    out = []
    batch, workers, repeats = c.data.batch_size, c.scaling.num_workers, c.data.stream.repeats
    if c.scaling.num_workers < 1:
        out.append(f"scaling.num_workers={workers}: must be >= 1")
    elastic = c.scaling.min_workers > 0
    if elastic and not 1 <= c.scaling.min_workers <= workers:
        out.append(f"scaling.min_workers={c.scaling.min_workers}: must be between 1 and scaling.num_workers="
                   f"{workers} (elastic), or 0 for a fixed group")
    if batch < 1:
        out.append(f"data.batch_size={batch}: must be >= 1 (global batch, in views; DeiT: 1024)")
    elif workers >= 1 and batch % workers and not elastic:  # elastic: rounded down per worker instead
        out.append(
            f"data.batch_size={batch} is not divisible by scaling.num_workers={workers}: the global batch "
            f"is split evenly over the workers; use a multiple of {workers} (e.g. "
            f"{_nearby_multiples(batch, workers)}) or change scaling.num_workers"
        )
    elif workers >= 1 and batch // workers < repeats:
        out.append(
            f"data.batch_size={batch} gives {batch // workers} samples per worker, fewer than "
            f"data.stream.repeats={repeats} views of one image: raise data.batch_size to at least "
            f"{repeats * workers} or lower data.stream.repeats"
        )
    elif workers >= 1 and c.data.mix.enabled and repeats % 2 and batch // workers < 2 * repeats:
        out.append(  # pipeline.loader.plan_batch(even=True): Mixup/CutMix pairs the views of a worker's batch
            f"data.batch_size={batch} gives {batch // workers} views per worker: Mixup/CutMix needs an even "
            f"number, i.e. at least 2 images of data.stream.repeats={repeats} views; raise data.batch_size to "
            f"at least {2 * repeats * workers} or turn mixing off (data.mix.prob=0)"
        )
    replay = c.data.augment.replay_views
    if 0 < replay < repeats:
        out.append(f"data.augment.replay_views={replay} is fewer than data.stream.repeats={repeats}: an image's "
                   f"views in a step are distinct crops; use a replay cache of at least {repeats} views")
    if c.data.augment.image_size != c.model.img_size:
        out.append(
            f"data.augment.image_size={c.data.augment.image_size} != model.img_size={c.model.img_size}: "
            "the model is built for the resolution the pipeline produces; set both to the same value"
        )
    mix = c.data.mix
    for name in ("mixup_alpha", "cutmix_alpha"):
        if getattr(mix, name) < 0:
            out.append(f"data.mix.{name}={getattr(mix, name)}: must be >= 0 (0 turns it off)")
    for name in ("prob", "switch_prob"):
        if not 0 <= getattr(mix, name) <= 1:
            out.append(f"data.mix.{name}={getattr(mix, name)}: must be a probability in [0, 1]")
    if not 0 <= mix.label_smoothing < 1:
        out.append(f"data.mix.label_smoothing={mix.label_smoothing}: must be in [0, 1), e.g. 0.1")
    return out


def _nearby_multiples(value: int, step: int) -> str:
    below, above = value // step * step, (value // step + 1) * step
    return f"{below} or {above}" if below > 0 else str(above)


def _optim_problems(c: TrainConfig) -> list[str]:
    o = c.optim
    out = []
    if o.name not in OPTIMIZERS:
        out.append(f"optim.name={o.name!r} is not a known optimizer: use one of {', '.join(OPTIMIZERS)}")
    if not o.lr > 0:
        out.append(f"optim.lr={o.lr}: must be > 0 (DeiT: 5e-4 per 512 samples)")
    if o.lr_batch_size < 1:
        out.append(f"optim.lr_batch_size={o.lr_batch_size}: must be >= 1 (DeiT: 512)")
    if o.weight_decay < 0:
        out.append(f"optim.weight_decay={o.weight_decay}: must be >= 0 (DeiT: 0.05)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        out.append(f"optim.betas={o.betas}: need two numbers in [0, 1), e.g. 0.9,0.999")
    if not o.eps > 0:
        out.append(f"optim.eps={o.eps}: must be > 0, e.g. 1e-8")
    if not 0 <= o.momentum < 1:
        out.append(f"optim.momentum={o.momentum}: must be in [0, 1), e.g. 0.9")
    if o.clip_grad is not None and not o.clip_grad > 0:
        out.append(f"optim.clip_grad={o.clip_grad}: must be > 0 (e.g. 1.0) or None for no clipping")
    if o.micro_batches < 1:
        out.append(f"optim.micro_batches={o.micro_batches}: must be >= 1 (1: the whole batch in one pass)")
    return out


def _schedule_problems(c: TrainConfig) -> list[str]:
    s = c.schedule
    out = []
    if s.epochs < 1:
        out.append(f"schedule.epochs={s.epochs}: must be >= 1")
    if not 0 <= s.warmup_epochs < max(s.epochs, 1):
        out.append(f"schedule.warmup_epochs={s.warmup_epochs}: must be in [0, schedule.epochs={s.epochs})")
    if s.warmup_lr < 0 or s.min_lr < 0:
        out.append(f"schedule.warmup_lr={s.warmup_lr} / schedule.min_lr={s.min_lr}: must be >= 0")
    if c.optim.lr > 0 and c.optim.lr_batch_size >= 1 and c.data.batch_size >= 1:
        peak = c.peak_lr
        if s.min_lr > peak:
            out.append(
                f"schedule.min_lr={s.min_lr} is above the peak lr {peak:.3g} (optim.lr={c.optim.lr} at "
                f"data.batch_size={c.data.batch_size}): lower schedule.min_lr or raise optim.lr"
            )
        if s.warmup_epochs > 0 and s.warmup_lr > peak:
            out.append(
                f"schedule.warmup_lr={s.warmup_lr} is above the peak lr {peak:.3g}: warmup would go down; "
                "lower schedule.warmup_lr"
            )
    return out


def _distill_problems(c: TrainConfig) -> list[str]:
    d = c.distill
    out = []
    if d.kind not in DISTILL_KINDS:
        out.append(f"distill.kind={d.kind!r}: use one of {', '.join(DISTILL_KINDS)}")
    if d.source not in TEACHER_SOURCES:
        out.append(f"distill.source={d.source!r}: use one of {', '.join(TEACHER_SOURCES)}")
    if d.kind != "none" and d.source == "cache" and not d.cache_url:
        out.append("distill.cache_url is empty: with distill.source=cache, point it at a `teacher-cache build` "
                   "output, or use distill.source=online")
    if d.compile_teacher and d.kind != "none" and d.source == "cache":
        out.append("distill.compile_teacher=true but distill.source=cache: the cached teacher does not run in "
                   "training; compile its build instead (`teacher-cache build --compile`) and set "
                   "distill.compile_teacher=false")
    if not d.tau > 0:
        out.append(f"distill.tau={d.tau}: must be > 0 (DeiT: 3.0)")
    if not 0 <= d.alpha <= 1:
        out.append(f"distill.alpha={d.alpha}: must be in [0, 1] (DeiT soft distillation: 0.1)")
    if c.model.distilled and d.kind == "none":
        out.append(
            "model.distilled=True but distill.kind='none': the distillation head needs a teacher; set "
            "distill.kind=hard (or soft), or train a model without a distillation token"
        )
    if d.kind != "none":
        out += _model_problems(d.teacher, "distill.teacher")
        if d.teacher.distilled:
            out.append("distill.teacher.distilled=True: a teacher is used for its plain logits; set False")
        if d.teacher.num_classes != c.model.num_classes:
            out.append(
                f"distill.teacher.num_classes={d.teacher.num_classes} != model.num_classes="
                f"{c.model.num_classes}: the teacher must predict the student's classes"
            )
        if d.source == "remote" and d.remote_actors < 1:
            out.append(f"distill.remote_actors={d.remote_actors}: must be >= 1 (teacher actors)")
        if d.source in ("online", "remote") and d.teacher.img_size != c.data.augment.image_size:
            out.append(
                f"distill.teacher.img_size={d.teacher.img_size} != data.augment.image_size="
                f"{c.data.augment.image_size}: an online teacher sees the student's batch; set the same "
                "resolution (DeiT sec. 4: a teacher at the target resolution)"
            )
    return out


def _misc_problems(c: TrainConfig) -> list[str]:
    out = []
    if c.loss.base not in LOSS_BASES:
        out.append(f"loss.base={c.loss.base!r}: use one of {', '.join(LOSS_BASES)}")
    if c.loss.bce_target_threshold is not None and c.loss.base != "bce":
        out.append("loss.bce_target_threshold is set but loss.base is not 'bce': set it to None")
    if c.runtime.compile_scope not in COMPILE_SCOPES:
        out.append(f"runtime.compile_scope={c.runtime.compile_scope!r}: use one of {', '.join(COMPILE_SCOPES)}")
    if not 0 < c.ema.decay < 1:
        out.append(f"ema.decay={c.ema.decay}: must be in (0, 1), e.g. 0.99996")
    if c.checkpoint.every_n_steps < 1:
        out.append(f"checkpoint.every_n_steps={c.checkpoint.every_n_steps}: must be >= 1")
    if c.checkpoint.keep < 1:
        out.append(f"checkpoint.keep={c.checkpoint.keep}: must be >= 1 (the latest is always kept)")
    if c.tracking.log_every_n_steps < 1:
        out.append(f"tracking.log_every_n_steps={c.tracking.log_every_n_steps}: must be >= 1")
    if not c.tracking.experiment:
        out.append("tracking.experiment is empty: name the MLflow experiment, e.g. distillery")
    return out


def _strict_problems(c: TrainConfig) -> list[str]:
    out = []
    for name in ("train_url", "val_url"):
        if not getattr(c.data, name):
            out.append(
                f"data.{name} is empty: give the shards' location (pipeline build-shards --dst), e.g. "
                f"data.{name}=s3://bucket/imagenet-shards"
            )
    if c.distill.kind != "none" and c.distill.source == "online" and not c.distill.teacher.pretrained_path:
        out.append(
            "distill.teacher.pretrained_path is not set: an online teacher needs its trained weights "
            "(a checkpoint file or URL); a randomly initialised teacher teaches nothing"
        )
    return out
