"""Find the samples of one split in an ImageNet-style folder tree.

Layouts understood (``root`` is ``--src``; the split folder is ``root/<split>`` when it exists, else ``root``):

* class folders: ``<split>/<class>/*.JPEG`` (ImageNet train, val re-arranged into folders, any ImageFolder);
* flat with a label file: ``<split>/*.JPEG`` plus ``LOC_val_solution.csv`` (Kaggle ImageNet: ``ImageId,``
  then a prediction string whose first word is the wnid) or lines ``<file> <label>`` (label a class name
  or an integer index), given with ``--labels`` or found beside the images or in ``root``.

Class indices are the sorted class-folder names, as torchvision's ImageFolder and timm number them, so
official DeiT/CaiT checkpoints' outputs mean the same classes. An empty class folder keeps its index (it
is reported, not dropped: dropping it would shift every later class).

The scan only lists and stats files; reading and checking the bytes happens when shards are written.

Links and names: a symlinked class folder and a symlinked image file are followed (the usual way to build
a subset); a symlinked folder inside a class folder is not (a link to its parent would loop forever) and
is listed as ignored in the report, as is a class-folder link that points back at the split folder or
above it. File and class names may be any Unicode; a file name that is not valid UTF-8 is kept (shown
with ``\\x..`` escapes in the manifest and report), a class folder name that is not is refused, since it
must go into ``classes.json``.
"""

from __future__ import annotations

import csv
import logging
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pnm"}
)
LABEL_FILE_NAMES = ("LOC_val_solution.csv", "val_labels.txt", "labels.txt", "val.txt")

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source tree cannot be turned into a dataset; the message says which path and what to do."""


@dataclass(frozen=True)
class SourceSample:
    relpath: str  # path relative to the split folder, '/'-separated
    label: int
    size: int  # bytes on disk, used to cut shards to size before reading anything


@dataclass(frozen=True)
class Skipped:
    source: str
    reason: str


@dataclass
class SourceListing:
    split_dir: Path
    layout: str  # "class-folders" or "flat+labels"
    classes: list[str]
    samples: list[SourceSample]
    skipped: list[Skipped] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


def display_path(relpath: str) -> str:
    """A printable form of a file name that may hold undecodable bytes (kept as surrogates by os)."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


SPLIT_NAMES = ("train", "val", "validation", "test")  # folders that mark --src as a dataset root


def resolve_split_dir(root: Path, split: str) -> Path:
    """``root/<split>`` when it exists, else ``root`` itself as the split's folder, except where ``root``
    holds other splits' folders (then its class folders would be "train", "val": a wrong dataset)."""
    if not root.is_dir():
        raise SourceError(f"--src {root}: not a folder; pass the ImageNet root or one split's folder")
    candidate = root / split
    if candidate.is_dir():
        return candidate
    folders = {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")}
    splits = sorted(folders & set(SPLIT_NAMES))
    # a dataset root: two splits' folders, or nothing but splits (an ImageFolder may have a class "test")
    if len(splits) >= 2 or (splits and folders <= set(SPLIT_NAMES)):
        raise SourceError(f"--src {root} has no '{split}' folder (it holds {', '.join(s + '/' for s in splits)}): "
                          f"pass --split {' or --split '.join(splits)}, or --src one split's folder")
    if root.name in SPLIT_NAMES and root.name != split and {root.name, split} != {"val", "validation"}:
        log.warning("--src %s is a '%s' folder, built as split '%s' (pass --split %s to name it so)",
                    root, root.name, split, root.name)
    return root


def scan(root: str | os.PathLike, split: str = "train", labels_file: str | None = None,
         classes: list[str] | None = None) -> SourceListing:
    """List the samples of ``split`` under ``root``; ``classes`` fixes the index of each class name."""
    root = Path(root)
    split_dir = resolve_split_dir(root, split)
    entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    class_dirs = [e for e in entries if e.is_dir(follow_symlinks=True) and not e.name.startswith(".")]
    loops = [e for e in class_dirs if e.is_symlink() and _loops_back(e, split_dir)]
    class_dirs = [e for e in class_dirs if e not in loops]
    loose_images = [e for e in entries if e.is_file() and is_image_name(e.name)]
    if loose_images and (labels_file or not class_dirs):
        return _scan_flat(root, split_dir, loose_images, entries, labels_file, classes)
    if not class_dirs:
        raise SourceError(
            f"{split_dir}: no class folders and no images; expected {split_dir}/<class>/*.JPEG "
            f"or images with a label file (--labels)"
        )
    listing = _scan_class_folders(split_dir, class_dirs, loose_images, classes)
    listing.skipped += [Skipped(display_path(e.name), "symlinked folder loops back to the split folder "
                                                      "(not followed)") for e in loops]
    return listing


def _loops_back(entry: os.DirEntry, split_dir: Path) -> bool:
    """Whether a symlinked folder points at the split folder or one of its ancestors (walking it would
    list the split again, under a wrong class)."""
    target = Path(os.path.realpath(entry.path))
    here = Path(os.path.realpath(split_dir))
    return target == here or target in here.parents


def class_name(folder: str) -> str:
    """A class's identity: its name in Unicode NFC. macOS writes folder names decomposed (NFD), most other
    tools composed (NFC): a train split copied from a Mac and a val split unpacked on Linux must agree."""
    return unicodedata.normalize("NFC", folder)


def _scan_class_folders(split_dir: Path, class_dirs: list[os.DirEntry], loose: list[os.DirEntry],
                        classes: list[str] | None) -> SourceListing:
    for d in class_dirs:
        if display_path(d.name) != d.name:  # undecodable bytes, kept by os as surrogates
            raise SourceError(f"{split_dir}: class folder '{display_path(d.name)}' has a name that is not valid "
                              f"UTF-8; rename it (class names are written to classes.json)")
    folders: dict[str, str] = {}
    for d in class_dirs:
        other = folders.setdefault(class_name(d.name), d.name)
        if other != d.name:
            raise SourceError(f"{split_dir}: class folders {other!r} and {d.name!r} are the same name in two "
                              f"Unicode forms (NFC and NFD); merge them into one folder or rename one")
    names = sorted(folders)
    if classes is None:
        classes = names
    else:
        known = {class_name(c) for c in classes}
        unknown = [name for name in names if name not in known]
        if unknown:
            raise SourceError(
                f"{split_dir}: class folders {unknown[:5]} are not in the given class list "
                f"({len(classes)} classes); build the train split first or pass the matching --classes"
            )
    index = {class_name(name): i for i, name in enumerate(classes)}
    samples: list[SourceSample] = []
    skipped = [Skipped(e.name, "image outside any class folder") for e in loose]
    empty: list[str] = []
    for class_dir in class_dirs:
        found = 0
        for relpath, size in _walk_files(Path(class_dir.path), class_dir.name, skipped):
            samples.append(SourceSample(relpath, index[class_name(class_dir.name)], size))
            found += 1
        if found == 0:
            empty.append(class_name(class_dir.name))
    return SourceListing(split_dir, "class-folders", list(classes), samples, skipped, empty)


def _walk_files(folder: Path, prefix: str, skipped: list[Skipped]) -> list[tuple[str, int]]:
    """Image files below ``folder`` (sorted; symlinked folders are not followed, so loops cannot trap us,
    and are listed in ``skipped``)."""
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        rel_dir = os.path.relpath(dirpath, folder)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in links:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            skipped.append(Skipped(display_path(f"{prefix}/{rel}"), "symlinked folder not followed (could loop)"))
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            relpath = f"{prefix}/{rel}"
            full = os.path.join(dirpath, name)
            if not is_image_name(name):
                skipped.append(Skipped(display_path(relpath), "not an image file (extension)"))
                continue
            try:
                size = os.stat(full).st_size
            except OSError as exc:  # dangling symlink, permission denied
                skipped.append(Skipped(display_path(relpath), f"cannot stat: {exc.strerror}"))
                continue
            found.append((relpath, size))
    return found


def _scan_flat(root: Path, split_dir: Path, images: list[os.DirEntry], entries: list[os.DirEntry],
               labels_file: str | None, classes: list[str] | None) -> SourceListing:
    path = Path(labels_file) if labels_file else _find_label_file(root, split_dir)
    if path is None:
        raise SourceError(
            f"{split_dir}: images without class folders need a label file; pass --labels FILE "
            f"(LOC_val_solution.csv, or lines '<file> <label>'), or arrange them as <class>/<file>"
        )
    labels = read_label_file(path)
    if classes is None:
        textual = sorted({class_name(v) for v in labels.values() if not v.isdigit()})
        classes = textual or [str(i) for i in range(max(int(v) for v in labels.values()) + 1)]
    index = {class_name(name): i for i, name in enumerate(classes)}
    samples: list[SourceSample] = []
    skipped = [Skipped(e.name, "not an image file (extension)") for e in entries
               if e.is_file() and not is_image_name(e.name) and Path(e.path) != path]
    for entry in images:
        label_text = labels.get(entry.name) or labels.get(os.path.splitext(entry.name)[0])
        if label_text is None:
            skipped.append(Skipped(display_path(entry.name), f"no label in {path.name}"))
            continue
        label = int(label_text) if label_text.isdigit() else index.get(class_name(label_text))
        if label is None or not 0 <= label < len(classes):
            skipped.append(Skipped(display_path(entry.name), f"label {label_text!r} is not a known class"))
            continue
        samples.append(SourceSample(entry.name, label, entry.stat().st_size))
    return SourceListing(split_dir, "flat+labels", list(classes), samples, skipped, [])


def _find_label_file(root: Path, split_dir: Path) -> Path | None:
    """The split folder, ``--src`` and three folders above it: Kaggle's tree keeps LOC_val_solution.csv
    beside ILSVRC/, three levels above ILSVRC/Data/CLS-LOC (the folder holding train/ and val/)."""
    for folder in (split_dir, root, *list(root.parents)[:3]):
        for name in LABEL_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def read_label_file(path: Path) -> dict[str, str]:
    """Map image name (with or without extension) -> label text, from either supported format."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SourceError(f"--labels {path}: cannot read ({exc.strerror})") from None
    labels: dict[str, str] = {}
    if text.startswith("ImageId,"):  # Kaggle LOC_val_solution.csv: ImageId,PredictionString
        for row in csv.DictReader(text.splitlines()):
            words = (row.get("PredictionString") or "").split()
            if words:
                labels[row["ImageId"]] = words[0]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise SourceError(f"{path}:{number}: expected '<file> <label>', got {line!r}")
            labels[unicodedata.normalize("NFC", parts[0])] = parts[1]
            labels.setdefault(parts[0], parts[1])
    if not labels:
        raise SourceError(f"{path}: no labels found; expected LOC_val_solution.csv or '<file> <label>' lines")
    return labels
