"""``python -m trainer.main``: pick a recipe, apply ``key=value`` overrides, validate, then train.

    python -m trainer.main --list                                   # every recipe and its key numbers
    python -m trainer.main deit_s_distill optim.lr=1e-3 --print-config   # the resolved config, then exit
    python -m trainer.main deit_s data.train_url=s3://b/in1k data.val_url=s3://b/in1k --storage s3://b/runs

:func:`train` hands the config to ``trainer.run.run`` (Ray Train workers running ``trainer.worker``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from trainer import recipes
from trainer.config import ConfigError, TrainConfig, to_dict
from trainer.overrides import OverrideError, apply_overrides, flatten

__all__ = ["main", "resolve", "recipe_table", "train"]


def resolve(name: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Recipe ``name`` with ``overrides`` applied, validated (not strictly: data URLs may be missing)."""
    return apply_overrides(recipes.get(name), overrides).validate()


def train(config: TrainConfig, storage: str | None = None, name: str | None = None, max_failures: int = 0,
          resume: str | None = None) -> None:
    """Run training for ``config`` on Ray Train (``trainer.run.run``): strict validation (data URLs, teacher
    weights), ``scaling.num_workers`` workers, checkpoints under ``storage``/``name``, up to ``max_failures``
    worker-group restarts, optionally starting from the checkpoint ``resume``."""
    from trainer.run import run

    result = run(config, storage_path=storage, name=name, max_failures=max_failures, resume=resume)
    metrics = {k: v for k, v in (result.metrics or {}).items() if k.startswith("eval/") or k in ("step", "epoch")}
    print(json.dumps({"run": str(result.path), "checkpoint": str(result.checkpoint.path) if result.checkpoint else None,
                      "metrics": metrics}, indent=2))


def _fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


def recipe_table() -> str:
    """One line per recipe with its key numbers: model, resolution, epochs, batch, peak lr, distillation."""
    header = ("recipe", "model (timm)", "res", "epochs", "batch", "lr", "optim", "distillation", "numbers from")
    rows = [header]
    for name in recipes.names():
        entry = recipes.info(name)
        c = entry.build()
        if c.distill.kind == "none":
            distill = "-"
        else:
            token = "+token" if c.model.distilled else ""
            distill = f"{c.distill.kind}{token} <- {c.distill.teacher.name}@{c.distill.teacher.img_size}"
        rows.append(
            (
                name,
                c.model.name,
                str(c.model.img_size),
                str(c.schedule.epochs),
                str(c.data.batch_size),
                _fmt_lr(c.peak_lr),
                c.optim.name,
                distill,
                entry.source,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("lr: the peak learning rate at the recipe's global batch (after the DeiT scaling rule).")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.main",
        description="Train a DeiT/CaiT recipe: RECIPE [key=value ...]. Overrides use dotted keys, e.g. "
        "optim.lr=1e-3 data.augment.reprob=0 schedule.epochs=10 distill.kind=soft.",
    )
    p.add_argument("recipe", nargs="?", help="recipe name (see --list)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides")
    p.add_argument("--list", action="store_true", help="list every recipe with its key numbers and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--storage", metavar="PATH_OR_URL", help="where checkpoints go (default: checkpoint.url, "
                   "else $DISTILLERY_STORAGE, else ./runs); a run is the folder STORAGE/NAME")
    p.add_argument("--name", help="run name (default: tracking.run_name, else MODEL-TIME); the same name and "
                   "storage continue that run from its latest checkpoint")
    p.add_argument("--max-failures", type=int, default=0, metavar="N",
                   help="worker-group restarts from the latest checkpoint before giving up (-1: no limit)")
    p.add_argument("--resume", metavar="CHECKPOINT", help="start from this checkpoint (or the latest in this "
                   "folder) when the run has none of its own")
    p.add_argument(
        "--format",
        choices=("json", "flat"),
        default="json",
        help="--print-config output: nested JSON (default) or flat key=value lines (override syntax)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage or config error)."""
    args = _parser().parse_intermixed_args(argv)  # overrides may also follow the flags
    if args.list:
        print(recipe_table())
        return 0
    if not args.recipe:
        print("error: give a RECIPE (python -m trainer.main --list shows them)", file=sys.stderr)
        return 2
    try:
        config = resolve(args.recipe, args.overrides)
    except (recipes.UnknownRecipe, OverrideError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        if args.format == "flat":
            print("\n".join(f"{k}={v}" for k, v in flatten(config).items()))
        else:
            print(json.dumps({"recipe": args.recipe, "config": to_dict(config)}, indent=2))
        return 0
    from pipeline.cli_errors import describe, user_errors
    from trainer.checkpoint import CheckpointError

    try:
        train(config, storage=args.storage, name=args.name, max_failures=args.max_failures, resume=args.resume)
    except user_errors(CheckpointError) as exc:  # ConfigError, DatasetError, CacheMismatch: ValueErrors
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
