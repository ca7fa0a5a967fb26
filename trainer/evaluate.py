"""``python -m trainer.evaluate RECIPE WEIGHTS [key=value ...]``: evaluate a checkpoint on the val shards.

DeiT's ``main.py --eval --resume CHECKPOINT``: top-1 / top-5 of the class head (and for a distilled
model, of the distillation head and the fused classifier), with ReaL labels (``data.real_labels``) and on
ImageNet-V2 (``data.v2_url``) when the recipe or the overrides give them. The same evaluation as the
trainer's at each epoch end (`trainer.worker.evaluate_model`: the recipe's eval transform through DALI,
bf16 autocast on a GPU), in this process on one device, without Ray.

``WEIGHTS``: a distillery run or checkpoint folder (local or on object storage), or a checkpoint file as
timm and the DeiT / CaiT releases write them; ``--ema`` takes the EMA weights a folder, DeiT's
``model_ema`` or timm's ``state_dict_ema`` holds. The weights must be the
model's, as DeiT's strict load wants them: a head of another class count (``model.num_classes``), weights
the model has no place for, or a position embedding of another resolution (``model.img_size``) are
refused, where fine-tuning (``model.pretrained_path``) starts a new head, ignores the rest and resamples.
Prints one JSON object: the weights, their sha256, the device and the metrics. The device is the GPU when
the recipe trains on one (``scaling.use_gpu``) and there is one, else the CPU; ``--device`` chooses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from trainer.config import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["EvaluateError", "evaluate_checkpoint", "main"]


class EvaluateError(ValueError):
    """A command-line choice this machine cannot serve (the device); the message says what to give."""


def evaluate_checkpoint(config: TrainConfig, weights: str, device: torch.device, batch_size: int = 256,
                        ema: bool = False, dali_threads: int = 2) -> dict[str, Any]:
    """``weights`` in the recipe's model, evaluated on ``config.data.val_url`` (and V2, ReaL when set)."""
    from pipeline.loader import EvalLoader
    from pipeline.storage import Location
    from pipeline.stream import ShardSet
    from trainer.checkpoint import CheckpointError, load_pretrained
    from trainer.real_labels import load_real_labels
    from trainer.run import check_splits
    from trainer.worker import evaluate_model

    check_splits(config, [(config.data.val_url, "val")])
    model = config.model.build()
    loaded = load_pretrained(model, weights, prefer_ema=ema)
    # load_pretrained adapts what fine-tuning can start from; an evaluation needs the model that was trained
    if loaded["missing"]:
        raise CheckpointError(
            f"{weights} has no weights for {loaded['missing'][:3]} of {config.model.name} with "
            f"model.num_classes={config.model.num_classes}: evaluate with the class count and the recipe "
            f"(a distilled model or not) the checkpoint was trained with")
    if loaded["unexpected"]:
        raise CheckpointError(
            f"{weights} holds weights {config.model.name} has no place for (e.g. {loaded['unexpected'][:3]}): "
            f"evaluate with the recipe and architecture overrides the checkpoint was trained with")
    if loaded["resampled"]:
        raise CheckpointError(
            f"{weights} was trained at another resolution than model.img_size={config.model.img_size} (its "
            f"{loaded['resampled'][0]} has another grid): evaluate with the resolution it was trained at, or "
            f"fine-tune it first (model.pretrained_path)")
    if ema and not loaded["ema"]:
        raise CheckpointError(f"{weights} holds no EMA weights (a distillery run trained with ema.enabled=true, "
                              f"or a DeiT / timm file with model_ema / state_dict_ema, has them); evaluate "
                              f"without --ema")
    if config.runtime.channels_last:  # the memory format the trainer's student has
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device)
    data_device = "cpu" if device.type == "cpu" else str(device)
    real = None
    if config.data.real_labels:
        real = load_real_labels(config.data.real_labels, Location(config.data.val_url), config.model.num_classes)
    metrics: dict[str, float] = {}
    for prefix, url, labels in (("eval", config.data.val_url, real), ("eval_v2", config.data.v2_url, None)):
        if url:
            loader = EvalLoader(ShardSet.open(Location(url), "val"), config.data, batch_size, device=data_device,
                                dali_threads=dali_threads)
            metrics.update(evaluate_model(model, loader, config, device, prefix, labels))
    return {"weights": weights, "sha256": loaded["sha256"], "ema": loaded["ema"], "model": config.model.name,
            "device": str(device), "metrics": metrics}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Evaluate a checkpoint on a recipe's val shards: RECIPE WEIGHTS [key=value ...], e.g. "
        "deit_s_distill runs/deit_s data.val_url=s3://bucket/imagenet-shards.")
    p.add_argument("recipe", help="the recipe the weights belong to (python -m trainer.main --list)")
    p.add_argument("weights", help="a distillery run or checkpoint folder, or a timm / DeiT checkpoint file "
                   "(local path or URL)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides, as trainer.main's")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights (an ema.enabled=true run, "
                   "or a DeiT / timm file's model_ema / state_dict_ema)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per eval batch (256)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when the recipe trains on a GPU and "
                   "there is one, else cpu)")
    return p


def _device(name: str | None, config: TrainConfig) -> torch.device:
    if name is None:
        return torch.device("cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise EvaluateError(f"--device {name}: give cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EvaluateError(f"--device {name}: torch sees {torch.cuda.device_count()} GPUs here; give --device cpu"
                          + (" or cuda:0" if torch.cuda.device_count() else ""))
    return device


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage, config or input error)."""
    from pipeline.cli_errors import describe, user_errors
    from pipeline.stream import StreamError
    from trainer import recipes
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.main import resolve
    from trainer.overrides import OverrideError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_intermixed_args(argv)
    if args.batch_size < 1:
        print(f"error: --batch-size {args.batch_size}: give at least 1", file=sys.stderr)
        return 2
    try:
        config = resolve(args.recipe, args.overrides)
        if not config.data.val_url:
            raise ConfigError([f"data.val_url: recipe {args.recipe} names no val shards; add data.val_url=URL"])
        result = evaluate_checkpoint(config, args.weights, _device(args.device, config), args.batch_size, args.ema)
    except (recipes.UnknownRecipe, OverrideError, ConfigError, *user_errors(CheckpointError, StreamError)) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
