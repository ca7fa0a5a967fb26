"""Checkpoints on disk: atomic writes, checksums, refusals, weights-only loading, pos-embed resampling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    CHECKSUM_FILE,
    META_FILE,
    STATE_FILE,
    CheckpointError,
    TrainState,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_pretrained,
    restore_rng,
    safe_config,
    save_checkpoint,
    verify_checkpoint,
)

FINGERPRINT = "ab" * 32


def _state(step: int = 7, size: int = 8) -> TrainState:
    model = torch.nn.Sequential(torch.nn.Linear(size, size), torch.nn.LayerNorm(size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, size)).sum().backward()
    optimizer.step()
    loader = {"0": {"version": 1, "step": step, "stream": {"position": 3 * step, "rank": 0}},
              "1": {"version": 1, "step": step, "stream": {"position": 3 * step, "rank": 1}}}
    return TrainState(step=step, epoch=1, model=model.state_dict(), optimizer=optimizer.state_dict(),
                      ema={k: v * 0.5 for k, v in model.state_dict().items()}, loader=loader,
                      rng={"0": capture_rng(), "1": capture_rng()}, schedule={"peak": 1e-3},
                      config={"model.name": "x", "data.train_url": "s3://user:secret@host/bucket"},
                      fingerprint=FINGERPRINT, extra={"mlflow_run_id": "abc"})


def _rewrite_checksums(path: Path) -> None:
    """Make the checksum file agree with the files again (to test what lies behind the checksum check)."""
    import hashlib

    sums = json.loads((path / CHECKSUM_FILE).read_text())
    sums["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in sums["files"]}
    (path / CHECKSUM_FILE).write_text(json.dumps(sums))


def test_round_trip_keeps_every_part(tmp_path: Path) -> None:
    state = _state()
    path = save_checkpoint(state, tmp_path)
    assert path.name == "step-00000007" and sorted(p.name for p in path.iterdir()) == sorted(
        [STATE_FILE, META_FILE, CHECKSUM_FILE])
    back = load_checkpoint(path, expect_fingerprint=FINGERPRINT)
    assert back.step == 7 and back.epoch == 1 and back.fingerprint == FINGERPRINT
    for key, value in state.model.items():
        assert torch.equal(back.model[key], value) and torch.equal(back.ema[key], state.ema[key])
    assert back.optimizer["state"][0]["step"] == state.optimizer["state"][0]["step"]
    assert torch.equal(back.optimizer["state"][0]["exp_avg"], state.optimizer["state"][0]["exp_avg"])
    assert back.loader == state.loader and back.extra == {"mlflow_run_id": "abc"}
    assert torch.equal(back.rng["1"]["torch"], state.rng["1"]["torch"])
    # no credentials on disk: the URL's user-info is gone
    assert back.config["data.train_url"] == "s3://host/bucket"
    assert b"secret" not in (path / META_FILE).read_bytes()


def test_rng_states_round_trip() -> None:
    saved = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng(json.loads(json.dumps({k: v for k, v in saved.items() if k != "torch"})) | {"torch": saved["torch"]})
    again = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checksum_catches_a_corrupted_file(tmp_path: Path) -> None:
    path = save_checkpoint(_state(), tmp_path)
    data = bytearray((path / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: state\.pt has sha256"):
        load_checkpoint(path)


def test_another_dataset_or_format_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(_state(), tmp_path)
    with pytest.raises(CheckpointError, match="fingerprint abababab.*train shards now have fingerprint cdcdcd"):
        load_checkpoint(path, expect_fingerprint="cd" * 32)
    meta = json.loads((path / META_FILE).read_text())
    meta["version"] = 99
    (path / META_FILE).write_text(json.dumps(meta))
    _rewrite_checksums(path)
    with pytest.raises(CheckpointError, match="version 99.*reads 'distillery-checkpoint' version 1 only"):
        load_checkpoint(path)


def test_tensors_are_loaded_weights_only(tmp_path: Path) -> None:
    """A state.pt that would run code when unpickled is refused even with valid checksums."""
    path = save_checkpoint(_state(), tmp_path)
    torch.save({"model": {}, "rng": {}, "payload": Path("/etc/passwd")}, path / STATE_FILE)
    _rewrite_checksums(path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_checkpoint(path)


_WRITER = textwrap.dedent("""
    import sys, torch
    from trainer.checkpoint import TrainState, save_checkpoint
    big = {"w": torch.randn(12_000_000)}  # ~48 MB per write, so a kill lands mid-write
    step = 1
    while True:
        save_checkpoint(TrainState(step=step, epoch=0, model=big, fingerprint="f"), sys.argv[1])
        print(step, flush=True)
        step += 1
""")


def test_a_write_killed_half_way_leaves_the_previous_checkpoint_latest(tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill while a later one is being written
            if any(p.name.startswith(".tmp-") and (p / STATE_FILE).exists() for p in folder.iterdir()):
                break
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    leftovers = [p for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the writer was not caught mid-write"
    latest = latest_checkpoint(folder)
    assert latest is not None and not latest.name.startswith(".")
    meta = verify_checkpoint(latest)  # complete and intact
    assert meta["step"] == max(int(p.name.split("-")[1]) for p in folder.iterdir() if p.name.startswith("step-"))
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        verify_checkpoint(leftovers[0])


def test_same_step_written_again_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(_state(step=3), tmp_path)
    second = _state(step=3)
    path = save_checkpoint(second, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000003"]
    assert torch.equal(load_checkpoint(path).model["0.weight"], second.model["0.weight"])


def test_safe_config_strips_url_credentials() -> None:
    flat = safe_config({"a": "https://u:p@example.org/x", "b": "s3://bucket/key", "c": "plain@text"})
    assert flat == {"a": "https://example.org/x", "b": "s3://bucket/key", "c": "plain@text"}


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_pretrained_224_checkpoint_fine_tunes_at_384(tmp_path: Path, name: str) -> None:
    """DeiT sec. 3: the 14x14 position embedding is resampled (bicubic) to 24x24; tokens keep theirs."""
    import timm
    from timm.layers import resample_abs_pos_embed

    source = timm.create_model(name, pretrained=False, num_classes=1000)
    file = tmp_path / "deit.pth"
    torch.save({"model": source.state_dict()}, file)  # the layout of the DeiT releases
    target = timm.create_model(name, pretrained=False, img_size=384, num_classes=10)
    info = load_pretrained(target, str(file))
    prefix = 2 if "distilled" in name else 1
    assert target.pos_embed.shape == (1, prefix + 24 * 24, 192)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [24, 24], [14, 14], num_prefix_tokens=prefix,
                                      interpolation="bicubic", antialias=False)
    assert torch.allclose(target.pos_embed.detach(), expected)
    assert torch.equal(target.pos_embed[:, :prefix].detach(), source.pos_embed[:, :prefix].detach())
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert "head.weight" in info["missing"]  # 1000 -> 10 classes: the head stays fresh
    assert info["resampled"] == ["pos_embed"]
    assert len(info["sha256"]) == 64


def test_pretrained_from_our_checkpoint_folder(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    save_checkpoint(TrainState(step=2, epoch=0, model=model.state_dict(), fingerprint="f"), tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
    load_pretrained(fresh, str(tmp_path))
    assert torch.equal(fresh[0].weight, model[0].weight)
    with pytest.raises(CheckpointError, match="weights missing"):
        load_pretrained(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), str(tmp_path))


def test_pretrained_ema_weights_are_taken_and_reported_only_where_the_checkpoint_has_them(tmp_path: Path) -> None:
    model, ema = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    save_checkpoint(TrainState(step=2, epoch=0, model=model.state_dict(), ema=ema.state_dict(), fingerprint="f"),
                    tmp_path / "with")
    save_checkpoint(TrainState(step=2, epoch=0, model=model.state_dict(), fingerprint="f"), tmp_path / "without")
    fresh = torch.nn.Linear(4, 4)
    assert load_pretrained(fresh, str(tmp_path / "with"), prefer_ema=True)["ema"] is True
    assert torch.equal(fresh.weight, ema.weight)
    assert load_pretrained(fresh, str(tmp_path / "with"))["ema"] is False
    assert torch.equal(fresh.weight, model.weight)
    assert load_pretrained(torch.nn.Linear(4, 4), str(tmp_path / "without"), prefer_ema=True)["ema"] is False
    torch.save(model.state_dict(), tmp_path / "file.pth")  # a plain file has no EMA of its own
    assert load_pretrained(torch.nn.Linear(4, 4), str(tmp_path / "file.pth"), prefer_ema=True)["ema"] is False
    # DeiT's main.py and timm's train.py files keep it beside the model
    for model_key, ema_key in (("model", "model_ema"), ("state_dict", "state_dict_ema")):
        torch.save({model_key: model.state_dict(), ema_key: ema.state_dict(), "epoch": 3}, tmp_path / "both.pth")
        assert load_pretrained(fresh, str(tmp_path / "both.pth"), prefer_ema=True)["ema"] is True
        assert torch.equal(fresh.weight, ema.weight)
        assert load_pretrained(fresh, str(tmp_path / "both.pth"))["ema"] is False
        assert torch.equal(fresh.weight, model.weight)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path: Path) -> None:
    from trainer.checkpoint import CorruptCheckpoint, checkpoints_newest_first, load_newest_intact

    for step in (2, 4, 6):
        save_checkpoint(_state(step=step), tmp_path)
    (tmp_path / ".tmp-unfinished").mkdir()  # an interrupted write is not a candidate
    found = checkpoints_newest_first(str(tmp_path))
    assert [Path(p).name for p in found] == ["step-00000006", "step-00000004", "step-00000002"]
    data = bytearray((tmp_path / "step-00000006" / STATE_FILE).read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the newest
    (tmp_path / "step-00000006" / STATE_FILE).write_bytes(bytes(data))
    (tmp_path / "step-00000004" / META_FILE).unlink()  # the one before lost a file
    assert load_newest_intact(found).step == 2
    with pytest.raises(CheckpointError, match="trained on the dataset with fingerprint"):  # not skipped over
        load_newest_intact(found, expect_fingerprint="cd" * 32)
    (tmp_path / "step-00000002" / STATE_FILE).unlink()
    with pytest.raises(CorruptCheckpoint, match="no intact checkpoint.*step-00000006 is corrupt"):
        load_newest_intact(found)
    assert checkpoints_newest_first(str(tmp_path / "nothing-here")) == []


@pytest.mark.s3
def test_checkpoints_on_object_storage_are_listed_newest_first(tmp_path: Path, object_store, s3_url: str,
                                                              s3_env) -> None:
    import fsspec

    from trainer.checkpoint import checkpoints_newest_first, load_newest_intact

    fs = fsspec.filesystem("s3", **object_store.storage_options())
    for step in (3, 5):
        path = save_checkpoint(_state(step=step), tmp_path)
        fs.put(str(path), f"{s3_url.removeprefix('s3://')}/{path.name}", recursive=True)
    found = checkpoints_newest_first(s3_url)
    assert found == [f"{s3_url}/step-00000005", f"{s3_url}/step-00000003"]
    # a run folder on object storage serves as weights (fine-tuning, a teacher) and as resume=URL: the newest
    from trainer.checkpoint import load_pretrained, resolve_checkpoint, weights_digest

    assert resolve_checkpoint(s3_url) == f"{s3_url}/step-00000005" == resolve_checkpoint(found[0])
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    info = load_pretrained(model, s3_url)
    assert info["sha256"] == weights_digest(s3_url) == weights_digest(f"{s3_url}/step-00000005")
    newest = torch.load(tmp_path / "step-00000005" / STATE_FILE, weights_only=True)["model"]
    assert all(torch.equal(model.state_dict()[k], newest[k]) for k in newest)
    assert resolve_checkpoint(f"{s3_url}/no-such-run") is None
    fs.rm(f"{s3_url.removeprefix('s3://')}/step-00000005/{STATE_FILE}")
    assert load_newest_intact(found).step == 3


def test_a_web_url_is_a_weights_file_never_a_checkpoint_folder() -> None:
    """Released weights live at https:// URLs; asking a web server whether they are a folder costs a
    request on every rank and means nothing."""
    from trainer.checkpoint import _is_folder

    assert not _is_folder("https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth")
    assert not _is_folder("http://127.0.0.1:1/never-contacted.pth")
