"""ImageNet-ReaL labels for the val split: the "ReaL" column of the papers' tables (DeiT Table 5, CaiT
Table 6 and the thesis report top-1 on ImageNet val, ReaL and V2).

ReaL (Beyer et al. 2020, "Are we done with ImageNet?") is ``real.json``: a list of 50,000 label lists, the
i-th for ``ILSVRC2012_val_{i+1:08d}.JPEG``; an empty list means no agreed label and the image is left out.
A prediction counts when it is one of the image's labels (top-5: when one of the five is), the rule of
timm's ``RealLabelsImagenet``. Images are matched by the file name the val manifest records as each
sample's ``source`` (flat val folders and class-folder layouts alike). ``data.real_labels=PATH_OR_URL``.

ImageNet-V2 needs no code of its own: its folders are named by class index, so build it with a classes
file that says so (``--classes`` with the JSON list ``["0", "1", ..., "999"]``) and set ``data.v2_url``.
"""

from __future__ import annotations

import json
import re

import torch

from pipeline.manifest import DatasetError, read_manifest
from pipeline.storage import Location

__all__ = ["RealLabels", "load_real_labels"]

_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")


class RealLabels:
    """The ReaL label set of every val sample, by key; ``hits`` counts correct predictions of a batch."""

    def __init__(self, sets: dict[str, frozenset[int]]):
        self.sets = sets

    def __len__(self) -> int:
        return sum(1 for labels in self.sets.values() if labels)

    def hits(self, logits: torch.Tensor, keys: list[str], ks: tuple[int, ...] = (1, 5)) -> tuple[list[int], int]:
        """(images whose top-k holds one of their ReaL labels, for each k; images that have labels)."""
        top = logits.topk(max(ks), dim=1).indices.cpu().numpy()
        counted, hits = 0, [0] * len(ks)
        for key, predicted in zip(keys, top, strict=True):
            labels = self.sets.get(key)
            if not labels:
                continue
            counted += 1
            for i, k in enumerate(ks):
                hits[i] += any(int(c) in labels for c in predicted[:k])
        return hits, counted


def load_real_labels(url: str, val: Location, num_classes: int, split: str = "val") -> RealLabels:
    """Read ``real.json`` (a local path or fsspec URL) and match it to the val split's samples; every
    problem is a ``DatasetError`` that names the file and what to fix."""
    location = Location(url)
    fs, path = location.fs_and_path()
    try:
        with fs.open(path, "rb") as handle:
            lists = json.loads(handle.read())
    except FileNotFoundError:
        raise DatasetError(f"data.real_labels={url}: no such file (ReaL's real.json, "
                           "github.com/google-research/reassessed-imagenet)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"data.real_labels={url}: not JSON ({exc}); expected ReaL's real.json") from None
    if not isinstance(lists, list) or not all(isinstance(x, list) for x in lists):
        raise DatasetError(f"data.real_labels={url}: expected a JSON list of label lists (ReaL's real.json)")
    for i, labels in enumerate(lists):
        if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < num_classes for c in labels):
            raise DatasetError(f"data.real_labels={url}: entry {i} ({labels!r}) holds a label outside "
                               f"0..{num_classes - 1} (model.num_classes={num_classes})")
    table = read_manifest(val, split)
    keys = table.column("key").to_pylist()
    sources = table.column("source").to_pylist()
    sets: dict[str, frozenset[int]] = {}
    for key, source in zip(keys, sources, strict=True):
        match = _VAL_NAME.search(source)
        if match is None:
            raise DatasetError(f"data.real_labels: {val.url} split {split!r} sample {key!r} comes from {source!r}, "
                               "not an ImageNet val file (ILSVRC2012_val_NNNNNNNN.JPEG): ReaL labels only "
                               "apply to ImageNet-1k's val split; unset data.real_labels")
        index = int(match.group(1)) - 1
        if not 0 <= index < len(lists):
            raise DatasetError(f"data.real_labels={url} has {len(lists)} entries, but {val.url} holds {source!r}: "
                               "use the real.json of the full 50,000-image val set")
        sets[key] = frozenset(lists[index])
    if not any(sets.values()):
        raise DatasetError(f"data.real_labels={url}: none of the {len(sets)} val samples of {val.url} has a ReaL label")
    return RealLabels(sets)
