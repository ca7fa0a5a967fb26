"""``python -m trainer.main``: pick a recipe, apply ``key=value`` overrides, validate, then train.

    python -m trainer.main --list                                   # every recipe and its key numbers
    python -m trainer.main deit_s_distill optim.lr=1e-3 --print-config   # the resolved config, then exit
    python -m trainer.main deit_s data.train_url=s3://b/in1k data.val_url=s3://b/in1k   # train (issue 5)

Training itself is not implemented yet: :func:`train` is the hook issue 5 fills in.
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


def train(config: TrainConfig) -> None:
    """Run training for ``config``. NOT IMPLEMENTED YET (issue 5).

    TODO(issue 5): the worker loop goes here. Planned shape: ``config.validate(strict=True)`` (data URLs,
    teacher weights), then launch ``scaling.num_workers`` Ray Train workers, each: restore checkpoint ->
    loader (pipeline) -> for each step: train_step, maybe log, maybe checkpoint, maybe eval.
    """
    raise SystemExit("training is not implemented yet (issue 5); use --print-config to see the resolved config")


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
    p.add_argument(
        "--format",
        choices=("json", "flat"),
        default="json",
        help="--print-config output: nested JSON (default) or flat key=value lines (override syntax)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a usage or config error)."""
    args = _parser().parse_args(argv)
    if args.list:
        print(recipe_table())
        return 0
    if not args.recipe:
        print("error: give a RECIPE (python -m trainer.main --list shows them)", file=sys.stderr)
        return 2
    try:
        config = resolve(args.recipe, args.overrides)
    except recipes.UnknownRecipe as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OverrideError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        if args.format == "flat":
            print("\n".join(f"{k}={v}" for k, v in flatten(config).items()))
        else:
            print(json.dumps({"recipe": args.recipe, "config": to_dict(config)}, indent=2))
        return 0
    train(config)  # raises SystemExit until issue 5 lands
    return 0


if __name__ == "__main__":
    sys.exit(main())
