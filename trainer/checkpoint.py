"""Training checkpoints (save / verify / load) and pretrained-weight loading for fine-tuning.

A checkpoint is a directory named ``step-<8 digits>`` holding three files:

* ``state.pt``: tensors only, loaded with ``torch.load(weights_only=True)``: the bare model's
  ``state_dict`` (no DDP ``module.`` prefix), the optimizer's, the EMA model's (when on) and each rank's
  torch RNG states.
* ``meta.json``: everything else, as JSON: format and version, step, epoch, every rank's loader state
  (``TrainLoader.state_dict()``, so a resumed run continues at the exact next sample), numpy / python
  RNG states per rank, the learning-rate schedule, the resolved config (flattened, never storage options
  or credentials), the train split's fingerprint and a few run facts (e.g. the MLflow run id).
* ``checksums.json``: sha256 of the two files above, written last.

Writing is atomic on a local file system: the files go to a hidden ``.tmp-...`` directory beside the
target, are flushed, and the directory is renamed; a process killed half-way leaves only the hidden
directory, which :func:`latest_checkpoint` ignores, so the previous checkpoint stays the latest. Under Ray
Train the directory is staged locally this way and handed to ``ray.train.report``, which uploads it to
the run's storage and registers it only once the upload is complete. Loading verifies the checksums and
refuses a checkpoint of another format version or of another dataset (fingerprint), naming the fix.

:func:`load_pretrained` loads timm / official DeiT checkpoint files (``{"model": state_dict}``) or one of
ours into a model, resampling the absolute position embedding bicubically when the resolution differs
(DeiT sec. 3, "Fine-tuning at different resolution": 224 -> 384) and dropping a classifier head whose
number of classes differs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "TrainState",
    "checkpoint_name",
    "save_checkpoint",
    "load_checkpoint",
    "verify_checkpoint",
    "latest_checkpoint",
    "checkpoint_step",
    "checkpoints_newest_first",
    "load_newest_intact",
    "capture_rng",
    "restore_rng",
    "safe_config",
    "load_pretrained",
    "adapt_state_dict",
    "resize_pos_embed",
]

FORMAT = "distillery-checkpoint"
FORMAT_VERSION = 1
STATE_FILE = "state.pt"
META_FILE = "meta.json"
CHECKSUM_FILE = "checksums.json"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which, why, and what to do."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose files are missing or differ from its checksums: an earlier one may be used."""


@dataclass
class TrainState:
    """Everything a run needs to continue exactly where a checkpoint was taken."""

    step: int
    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    ema: dict[str, torch.Tensor] | None = None
    loader: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(rank) -> TrainLoader.state_dict()
    rng: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(rank) -> capture_rng()
    schedule: dict[str, Any] = field(default_factory=dict)
    config: dict[str, str] = field(default_factory=dict)  # flattened resolved config (safe_config)
    fingerprint: str = ""  # the train split's dataset fingerprint
    extra: dict[str, Any] = field(default_factory=dict)  # run facts, e.g. {"mlflow_run_id": ...}


def checkpoint_name(step: int) -> str:
    """``step-00001234``: sorts by step, one name per step."""
    return f"step-{step:08d}"


def checkpoint_step(path: str | os.PathLike[str]) -> int:
    """The step in a checkpoint folder's name (``.../step-00001234`` -> 1234); -1 for any other name."""
    match = _NAME.match(str(path).rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else -1


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch CPU (+ CUDA) as tensors, numpy and python as JSON-able lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng` took (the CUDA part only where there are as many devices)."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- config


def _strip_userinfo(text: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://host/...``; anything else unchanged."""
    if "://" not in text or "@" not in text.split("://", 1)[1].split("/", 1)[0]:
        return text
    parts = urlsplit(text)
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def safe_config(config: Any) -> dict[str, str]:
    """The flattened resolved config with credentials removed (URL user-info), for checkpoints and MLflow.

    A ``TrainConfig`` holds URLs, never storage options; a URL may still carry ``user:password@``.
    """
    from trainer.overrides import flatten

    flat = config if isinstance(config, dict) else flatten(config)
    return {key: _strip_userinfo(str(value)) for key, value in flat.items()}


# ---------------------------------------------------------------------------------------------- save


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_synced(path: Path, data: bytes | Callable[[Any], None]) -> None:
    """``data`` (bytes, or a function writing to the open file) to ``path``, flushed and fsynced."""
    with open(path, "wb") as handle:
        if callable(data):
            data(handle)
        else:
            handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _split_rng(rng: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-rank RNG states -> (tensor part for state.pt, JSON part for meta.json)."""
    tensors = {rank: {k: v for k, v in s.items() if k in ("torch", "cuda")} for rank, s in rng.items()}
    plain = {rank: {k: v for k, v in s.items() if k not in ("torch", "cuda")} for rank, s in rng.items()}
    return tensors, plain


def save_checkpoint(state: TrainState, parent: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write ``state`` as ``parent/<name>`` (default ``step-<step>``) atomically; return its path.

    The files are written to a hidden sibling directory, fsynced, checksummed, and the directory is
    renamed into place (replacing an older checkpoint of the same name).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    name = name or checkpoint_name(state.step)
    final = parent / name
    tmp = parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        rng_tensors, rng_plain = _split_rng(state.rng)
        tensors: dict[str, Any] = {"model": state.model, "rng": rng_tensors}
        if state.optimizer is not None:
            tensors["optimizer"] = state.optimizer
        if state.ema is not None:
            tensors["ema"] = state.ema
        _write_synced(tmp / STATE_FILE, lambda handle: torch.save(tensors, handle))  # no copy in memory
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": state.step,
            "epoch": state.epoch,
            "fingerprint": state.fingerprint,
            "loader": state.loader,
            "rng": rng_plain,
            "schedule": state.schedule,
            "config": safe_config(state.config),
            "extra": state.extra,
            "has_optimizer": state.optimizer is not None,
            "has_ema": state.ema is not None,
        }
        _write_synced(tmp / META_FILE, (json.dumps(meta, indent=1) + "\n").encode())
        sums = {"format": FORMAT, "files": {f: _sha256_file(tmp / f) for f in (STATE_FILE, META_FILE)}}
        _write_synced(tmp / CHECKSUM_FILE, (json.dumps(sums, indent=1) + "\n").encode())
        if final.exists():  # the same step written again (e.g. re-run after a crash): replace it
            trash = parent / f".tmp-old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        with contextlib.suppress(OSError):  # make the rename itself durable
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------------------------------- load


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check ``path``'s files against its checksums; return its metadata. ``CheckpointError`` if not whole."""
    path = Path(path)
    sums_path = path / CHECKSUM_FILE
    if not sums_path.is_file():
        raise CorruptCheckpoint(
            f"{path} is not a complete checkpoint (no {CHECKSUM_FILE}: it was not finished writing, or is "
            "not a distillery checkpoint); resume from an earlier one (trainer.checkpoint.latest_checkpoint)"
        )
    sums = json.loads(sums_path.read_text())
    if sums.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {CHECKSUM_FILE} is not a {FORMAT} checksum file")
    for name, expected in sums["files"].items():
        file = path / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{path} is incomplete: {name} is missing; resume from an earlier checkpoint")
        actual = _sha256_file(file)
        if actual != expected:
            raise CorruptCheckpoint(
                f"{path} is corrupt: {name} has sha256 {actual[:16]}..., its checksum file says "
                f"{expected[:16]}...; resume from an earlier checkpoint"
            )
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}; this code reads "
            f"{FORMAT!r} version {FORMAT_VERSION} only: resume with the distillery version that wrote it, "
            "or start a new run (model weights alone can be loaded with model.pretrained_path)"
        )
    return meta


def local_copy(url: str, stack: contextlib.ExitStack) -> Path:
    """A local directory with the checkpoint at ``url`` (downloaded to a temp dir when remote)."""
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    import tempfile

    from pipeline.storage import Location

    fs, remote = Location(url).fs_and_path()
    local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ckpt-")))
    for name in (STATE_FILE, META_FILE, CHECKSUM_FILE):
        if fs.exists(f"{remote}/{name}"):
            fs.get(f"{remote}/{name}", str(local / name))
    return local


def load_checkpoint(path: str | os.PathLike[str], expect_fingerprint: str | None = None,
                    map_location: str | torch.device = "cpu") -> TrainState:
    """Read a checkpoint directory (local path or fsspec URL) after verifying it.

    Refuses (``CheckpointError``) a checkpoint that is incomplete or corrupt, of another format version,
    or, with ``expect_fingerprint``, one trained on another dataset. Tensors are read with
    ``weights_only=True`` (no code runs while loading).
    """
    with contextlib.ExitStack() as stack:
        local = local_copy(str(path), stack)
        meta = verify_checkpoint(local)
        if expect_fingerprint is not None and meta["fingerprint"] != expect_fingerprint:
            raise CheckpointError(
                f"{path} was trained on the dataset with fingerprint {meta['fingerprint'][:16]}, but the "
                f"train shards now have fingerprint {expect_fingerprint[:16]}: the shards were rebuilt or "
                "another dataset was given. Point data.train_url at the shards the run started with, or "
                "start a new run (load only the weights with model.pretrained_path)"
            )
        tensors = torch.load(local / STATE_FILE, map_location=map_location, weights_only=True)
    rng = {rank: {**plain, **tensors.get("rng", {}).get(rank, {})} for rank, plain in meta["rng"].items()}
    return TrainState(
        step=meta["step"], epoch=meta["epoch"], model=tensors["model"], optimizer=tensors.get("optimizer"),
        ema=tensors.get("ema"), loader=meta["loader"], rng=rng, schedule=meta["schedule"], config=meta["config"],
        fingerprint=meta["fingerprint"], extra=meta.get("extra", {}),
    )


def latest_checkpoint(parent: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step directly under ``parent`` (or ``parent`` itself if it
    is one); None when there is none. Hidden ``.tmp-*`` directories of interrupted writes are ignored."""
    found = resolve_checkpoint(str(parent))
    return Path(found) if found is not None else None


def checkpoints_newest_first(parent: str) -> list[str]:
    """Every finished checkpoint folder (``step-*`` with its checksum file) directly under ``parent``, a local
    folder or fsspec URL, newest first; [] when there is none."""
    from pipeline.storage import Location

    location = Location(str(parent))
    fs, root = location.fs_and_path()
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = "" if location.is_local else f"{location.protocol}://"
    found = []
    for entry in entries:
        entry = entry.rstrip("/")
        step = checkpoint_step(entry)
        if step >= 0 and fs.exists(f"{entry}/{CHECKSUM_FILE}"):
            found.append((step, prefix + entry))
    return [path for _, path in sorted(found, reverse=True)]


def load_newest_intact(candidates: list[str], expect_fingerprint: str | None = None) -> TrainState:
    """The first of ``candidates`` (newest first) that verifies; a corrupt or incomplete one is logged and
    the one before it tried. Other refusals (another dataset, format version) are not skipped over."""
    problems = []
    for path in candidates:
        try:
            return load_checkpoint(path, expect_fingerprint=expect_fingerprint)
        except CorruptCheckpoint as exc:
            problems.append(str(exc))
            log.warning("checkpoint %s cannot be used (%s); trying the one before it", path, exc)
    raise CorruptCheckpoint("no intact checkpoint to resume from: " + ("; ".join(problems) or "none found")
                            + ". Start the run again from scratch (another --name), or resume= a copy you trust")


# ---------------------------------------------------------------------------------------------- pretrained


def resize_pos_embed(posemb: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``posemb`` resampled (bicubic, DeiT sec. 3) to ``model``'s patch grid, prefix tokens kept as they are.

    Works out the number of prefix tokens (class / distillation tokens that have a position embedding)
    from the model: ``model.pos_embed`` has ``prefix + grid_h * grid_w`` rows.
    """
    from timm.layers import resample_abs_pos_embed

    target = model.pos_embed
    if posemb.shape == target.shape:
        return posemb
    grid = tuple(model.patch_embed.grid_size)
    prefix = target.shape[1] - grid[0] * grid[1]
    old_tokens = posemb.shape[1] - prefix
    old = math.isqrt(old_tokens)
    if prefix < 0 or old * old != old_tokens or posemb.shape[-1] != target.shape[-1]:
        raise CheckpointError(
            f"position embedding {tuple(posemb.shape)} does not fit the model's {tuple(target.shape)} "
            f"({prefix} prefix tokens + a {grid[0]}x{grid[1]} grid): is it the same architecture?"
        )
    log.info("resampling the position embedding from a %dx%d to a %dx%d grid (bicubic)", old, old, *grid)
    # antialias off: DeiT's fine-tuning code uses plain bicubic F.interpolate (and 224 -> 384 upsamples)
    return resample_abs_pos_embed(posemb.float(), new_size=list(grid), old_size=[old, old],
                                  num_prefix_tokens=prefix, interpolation="bicubic",
                                  antialias=False).to(posemb.dtype)


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Make a checkpoint's weights (`_unwrapped`) fit ``model``: resample ``pos_embed`` to the model's
    resolution, drop classifier heads of another class count."""
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key == "pos_embed" and hasattr(model, "pos_embed") and hasattr(model, "patch_embed"):
            value = resize_pos_embed(value, model)
        elif key in own and own[key].shape != value.shape and key.startswith(("head.", "head_dist.", "fc.")):
            log.warning("not loading %s %s: the model's is %s (another number of classes); it stays "
                        "freshly initialised", key, tuple(value.shape), tuple(own[key].shape))
            continue
        out[key] = value
    return out


def _unwrapped(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file: inside ``{"model": ...}`` / ``{"state_dict": ...}``, no ``module.``."""
    for key in ("model", "state_dict"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def _read_bytes(path: str) -> bytes:
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rb") as handle:
            return handle.read()
    return Path(path.removeprefix("file://")).read_bytes()


def resolve_checkpoint(path: str) -> str | None:
    """``path`` if it is a checkpoint folder, else the newest complete checkpoint directly under it; a local
    path or an fsspec URL (``s3://bucket/runs/deit-s/`` holding ``step-*`` folders). None when there is
    none, and for a plain file."""
    from pipeline.storage import Location

    fs, root = Location(path).fs_and_path()
    if fs.exists(f"{root}/{CHECKSUM_FILE}"):
        return path
    newest = checkpoints_newest_first(path)
    return newest[0] if newest else None


def _is_folder(path: str) -> bool:
    if path.startswith(("http://", "https://")):  # a released weights file; a web server lists no folders
        return False
    from pipeline.storage import Location

    fs, root = Location(path).fs_and_path()
    return fs.isdir(root)


def _folder_checkpoint(path: str) -> str:
    chosen = resolve_checkpoint(path)
    if chosen is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no step-* folder with {CHECKSUM_FILE})")
    return chosen


def _state_digest(checkpoint: str) -> str:
    """The sha256 of a checkpoint folder's tensors, from its checksum file."""
    return json.loads(_read_bytes(f"{checkpoint.rstrip('/')}/{CHECKSUM_FILE}"))["files"][STATE_FILE]


# sha256 of local weights files this process read, by (path, size, mtime): a driver checks a teacher's file
# (`check_fits`) and then names it by its digest (`weights_digest`), and a 300 MB file need not be read twice
_file_digests: dict[tuple[str, int, int], str] = {}


def _local_key(path: str) -> tuple[str, int, int] | None:
    if "://" in path and not path.startswith("file://"):
        return None
    stat = os.stat(path.removeprefix("file://"))
    return path, stat.st_size, stat.st_mtime_ns


def _file_digest(path: str, data: bytes | None = None) -> str:
    key = _local_key(path)
    if key is None or key not in _file_digests:
        digest = hashlib.sha256(_read_bytes(path) if data is None else data).hexdigest()
        if key is None:
            return digest
        _file_digests[key] = digest
    return _file_digests[key]


def weights_digest(path: str) -> str:
    """The sha256 that `load_pretrained` reports for ``path``, without loading it (a teacher's identity)."""
    if _is_folder(path):
        return _state_digest(_folder_checkpoint(path))
    return _file_digest(path)


def check_fits(build: Callable[[], torch.nn.Module], path: str) -> dict[str, Any]:
    """`load_pretrained` of ``path`` into the model ``build`` makes, built on the meta device (no memory, no
    initialisation): the errors a worker would meet later (not weights, weights missing, other shapes)
    raised now, in the driver, for the cost of reading the file once more."""
    with torch.device("meta"):
        model = build()
    with warnings.catch_warnings():  # a meta model ignores the values it is given: that is the point here
        warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
        return load_pretrained(model, path)


def check_local_weights(build: Callable[[], torch.nn.Module], path: str | None, name: str,
                        error: type[Exception]) -> dict[str, Any] | None:
    """The driver's check of weights the workers will load: for a local ``path``, ``error("<name>: no such
    file or folder")`` when it is not there, else `check_fits`'s report; None for no path or a URL (read
    where it is used)."""
    if not path or "://" in path:
        return None
    if not os.path.exists(path):
        raise error(f"{name}: no such file or folder")
    return check_fits(build, path)


def load_pretrained(model: torch.nn.Module, path: str, prefer_ema: bool = False) -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (in place) for fine-tuning or as a teacher.

    ``path``: a distillery checkpoint directory (its model, or its EMA with ``prefer_ema``), or a
    checkpoint file, local or URL, as timm and the DeiT releases write them (a ``state_dict``, or
    ``{"model": state_dict, ...}``; with ``prefer_ema`` the EMA that DeiT's ``model_ema`` or timm's
    ``state_dict_ema`` holds, if there is one), read with ``weights_only=True``. Returns ``{"path", "sha256",
    "missing", "unexpected", "ema", "resampled"}`` (``ema``: the EMA weights were the ones loaded;
    ``resampled``: the weights resized to the model's resolution, ``["pos_embed"]`` or none); raises
    ``CheckpointError`` if weights the model needs are missing (other than a classifier head of another
    class count).
    """
    if _is_folder(path):  # a distillery checkpoint folder or run folder, local or on object storage
        chosen = _folder_checkpoint(path)
        state = load_checkpoint(chosen)
        used_ema = prefer_ema and state.ema is not None
        weights = state.ema if used_ema else state.model
        digest = _state_digest(chosen)
    else:
        data = _read_bytes(path)
        digest = _file_digest(path, data)
        try:
            # DeiT's released files may carry the argparse namespace of the run; allow that one class only
            with torch.serialization.safe_globals([argparse.Namespace]):
                weights = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path} cannot be read as weights only ({type(exc).__name__}: {str(exc)[:200]}); save the "
                "model's state_dict alone (torch.save(model.state_dict(), PATH)) and pass that file"
            ) from exc
        emas = [k for k in ("model_ema", "state_dict_ema")
                if isinstance(weights, dict) and isinstance(weights.get(k), dict)]
        used_ema = prefer_ema and bool(emas)
        if used_ema:  # DeiT's main.py and timm's train.py keep the EMA beside the model
            weights = weights[emas[0]]
    own = model.state_dict()
    given = _unwrapped(weights)
    resampled = [k for k in ("pos_embed",) if k in given and k in own and given[k].shape != own[k].shape]
    weights = adapt_state_dict(given, model)
    reshaped = [k for k, v in weights.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if reshaped:  # load_state_dict would raise with every mismatch listed
        first = reshaped[0]
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: {len(reshaped)} weights have other shapes (e.g. {first}: "
            f"{list(weights[first].shape)} in the file, {list(own[first].shape)} in the model); check the model "
            "name / architecture overrides against the checkpoint's"
        )
    result = model.load_state_dict(weights, strict=False)
    heads = ("head.", "head_dist.", "fc.")
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    if missing:
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: {len(missing)} weights missing (e.g. {missing[:3]}); "
            "check the model name / architecture overrides against the checkpoint's"
        )
    if result.unexpected_keys:
        log.warning("%s: %d weights the model has no place for were ignored (e.g. %s)", path,
                    len(result.unexpected_keys), result.unexpected_keys[:3])
    return {"path": path, "sha256": digest, "missing": list(result.missing_keys),
            "unexpected": list(result.unexpected_keys), "ema": used_ema, "resampled": resampled}
