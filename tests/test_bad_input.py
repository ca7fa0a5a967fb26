"""Bad input, end to end: huge images, symlinks and unicode names in the source tree; hostile, truncated and
inconsistent shards and manifests. Each is handled as the module docstrings document and shows up in the
build report, `pipeline inspect`'s problems, the stream's metrics or a `DatasetError` naming the file."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import unicodedata
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.build import BuildConfig, BuildError, build_shards
from pipeline.config import StreamConfig
from pipeline.images import MAX_PIXELS, BadImage, prepare_image
from pipeline.inspect import inspect
from pipeline.manifest import DatasetError, read_classes, read_info
from pipeline.storage import Location
from pipeline.stream import SampleStream, ShardSet
from pipeline.synthetic import jpeg_bytes
from tests.imagetree import make_tree
from tests.shards import read_manifest_rows

COLOUR = (120, 30, 200)


def huge_jpeg(width: int, height: int, colour: tuple[int, int, int] = COLOUR) -> bytes:
    """A valid baseline JPEG of one colour, made without ever holding its pixels: a 16-px strip is encoded
    with a restart marker after each MCU row, its row repeated with cycling RST markers, and the frame
    header patched to ``height``. 20000x20000 takes ~50 ms and ~6 MB."""
    out = io.BytesIO()
    Image.new("RGB", (width, 16), colour).save(out, "JPEG", quality=75, subsampling=2, restart_marker_rows=1)
    data = out.getvalue()
    sos = data.index(b"\xff\xda")
    head_end = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    head, row = data[:head_end], data[head_end:-2]  # row: entropy-coded data of one MCU row, EOI cut off
    sof = head.index(b"\xff\xc0")
    head = head[:sof + 5] + struct.pack(">H", height) + head[sof + 7:]
    rows = -(-height // 16)
    return head + b"".join((bytes([0xFF, 0xD0 + (i - 1) % 8]) if i else b"") + row for i in range(rows)) + b"\xff\xd9"


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG (all black), compressed 1000 rows at a time: small to make, huge to decode."""
    assert height % 1000 == 0

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    pack = zlib.compressobj(1)
    rows = bytes(1 + -(-width // 8)) * 1000
    body = b"".join(pack.compress(rows) for _ in range(height // 1000)) + pack.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _build(src: Path, dst: Path, **options) -> dict:
    options.setdefault("workers", 1)
    options.setdefault("max_bad", 0.5)
    return build_shards(BuildConfig(src=str(src), dst=Location(str(dst)), **options)).info


def _report(dst: Path, split: str = "train") -> dict:
    return json.loads((dst / f"{split}.report.json").read_text())


# --- huge images --------------------------------------------------------------------------------------


def test_huge_jpeg_is_bad_without_max_side_and_a_long_thin_one_is_stored_as_is(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", num_classes=2, per_class=3, defects=False)
    cls = tree.classes[0]
    square, thin = huge_jpeg(20000, 20000), huge_jpeg(20000, 300)
    (tree.root / "train" / cls / "square.JPEG").write_bytes(square)
    (tree.root / "train" / cls / "thin.JPEG").write_bytes(thin)
    bomb_limit = Image.MAX_IMAGE_PIXELS
    info = _build(tree.root, tmp_path / "dst")
    assert bomb_limit == Image.MAX_IMAGE_PIXELS, "PIL's guard is restored for everyone else"
    report = _report(tmp_path / "dst")
    assert report["counts"]["bad"] == 1 and info["num_samples"] == len(tree.good) + 1
    [bad] = report["bad"]
    assert bad["source"] == f"{cls}/square.JPEG"
    assert "20000x20000" in bad["reason"] and "--max-side" in bad["reason"]
    rows = {r["source"]: r for r in read_manifest_rows(fsspec.filesystem("file"), str(tmp_path / "dst"))}
    stored = rows[f"{cls}/thin.JPEG"]  # 6 Mpx, far below MAX_PIXELS: byte for byte, no decode
    assert (stored["width"], stored["height"], stored["conversion"]) == (20000, 300, "")
    assert stored["size"] == len(thin)


def test_huge_jpeg_is_downscaled_with_max_side(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", num_classes=2, per_class=2, defects=False)
    cls = tree.classes[1]
    (tree.root / "train" / cls / "square.JPEG").write_bytes(huge_jpeg(20000, 20000))
    (tree.root / "train" / cls / "thin.JPEG").write_bytes(huge_jpeg(20000, 300))
    _build(tree.root, tmp_path / "dst", max_side=512)
    assert _report(tmp_path / "dst")["counts"]["bad"] == 0
    rows = {r["source"]: r for r in read_manifest_rows(fsspec.filesystem("file"), str(tmp_path / "dst"))}
    assert (rows[f"{cls}/square.JPEG"]["width"], rows[f"{cls}/square.JPEG"]["height"]) == (512, 512)
    assert (rows[f"{cls}/thin.JPEG"]["width"], rows[f"{cls}/thin.JPEG"]["height"]) == (512, 8)
    assert rows[f"{cls}/square.JPEG"]["conversion"] == "resized"
    shard = tmp_path / "dst" / f"train-{rows[f'{cls}/square.JPEG']['shard']:06d}.tar"
    with tarfile.open(shard) as tar, Image.open(tar.extractfile(f"{rows[f'{cls}/square.JPEG']['key']}.jpg")) as img:
        assert img.size == (512, 512)
        assert np.abs(np.asarray(img.convert("RGB"), dtype=float).mean(axis=(0, 1)) - COLOUR).max() < 4


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_downscaling_a_huge_jpeg_decodes_at_reduced_scale(tmp_path: Path) -> None:
    """Peak memory of prepare_image on a 20000x20000 JPEG, in a fresh process: a full decode needs 1.2 GB.
    (VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent, here pytest.)"""
    path = tmp_path / "square.jpg"
    path.write_bytes(huge_jpeg(20000, 20000))
    code = ("import re, sys; from pipeline.images import prepare_image; "
            "p = prepare_image(open(sys.argv[1], 'rb').read(), max_side=1024); "
            "print(p.width, p.height, re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read())[1])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out[:2] == ["1024", "1024"]
    assert int(out[2]) < 250_000, f"peak RSS {int(out[2]) // 1000} MB: the JPEG was decoded at full size"


def test_huge_non_jpeg_is_refused_before_decoding() -> None:
    png = huge_png(20000, 20000)  # 400 Mpx: PNG has no reduced-size decoding
    for max_side in (None, 512):
        with pytest.raises(BadImage, match=r"too large to decode \(20000x20000 px PNG.*downscale it before"):
            prepare_image(png, max_side=max_side)
    medium = huge_png(12000, 8000)  # 96 Mpx: over the store limit, decodable with --max-side
    assert MAX_PIXELS < 12000 * 8000
    with pytest.raises(BadImage, match="pass --max-side"):
        prepare_image(medium)


# --- symlinks and names in the source tree ------------------------------------------------------------


def test_symlinks_loops_and_links_are_handled_and_reported(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", num_classes=2, per_class=3, defects=False)
    split = tree.root / "train"
    a, b = tree.classes
    real = f"{b}/{b}_0.JPEG"
    (split / a / "self").symlink_to(".")  # a folder link to its own parent: os.walk would never end
    (split / a / "up").symlink_to("..")  # ... or to the split folder: every class again, wrongly labelled
    (split / a / "sub").mkdir()
    (split / a / "sub" / "loop").symlink_to("../..")
    (split / a / "link.JPEG").symlink_to(f"../{real}")  # a file link to a real image: a normal sample
    (split / a / "dangling.JPEG").symlink_to("nowhere.JPEG")
    (split / a / "knot.JPEG").symlink_to("knot.JPEG")  # a file link to itself
    (split / "zz_back").symlink_to(".")  # a class-folder link back to the split folder
    outside = tmp_path / "elsewhere" / "n5"
    outside.mkdir(parents=True)
    (outside / "x.JPEG").write_bytes(jpeg_bytes(np.random.default_rng(0), 30, 30))
    (split / "n5").symlink_to(outside)  # a class-folder link elsewhere: the usual subset trick, followed
    info = _build(tree.root, tmp_path / "dst")
    report = _report(tmp_path / "dst")
    ignored = {i["source"]: i["reason"] for i in report["ignored"]}
    assert set(ignored) == {f"{a}/self", f"{a}/up", f"{a}/sub/loop", f"{a}/dangling.JPEG", f"{a}/knot.JPEG",
                            "zz_back"}
    assert all("symlinked folder" in ignored[k] for k in (f"{a}/self", f"{a}/up", f"{a}/sub/loop", "zz_back"))
    assert "cannot stat" in ignored[f"{a}/dangling.JPEG"] and "cannot stat" in ignored[f"{a}/knot.JPEG"]
    assert report["counts"]["ignored"] == 6 and report["counts"]["bad"] == 0
    assert read_classes(Location(str(tmp_path / "dst"))) == [a, b, "n5"]
    rows = {r["source"]: r for r in read_manifest_rows(fsspec.filesystem("file"), str(tmp_path / "dst"))}
    assert set(rows) == {*tree.good, f"{a}/link.JPEG", "n5/x.JPEG"} and info["num_samples"] == len(rows)
    assert rows[f"{a}/link.JPEG"]["label"] == 0 and rows["n5/x.JPEG"]["label"] == 2
    assert rows[f"{a}/link.JPEG"]["sha256"] == rows[real]["sha256"]


def test_unicode_class_and_file_names_round_trip_to_the_stream(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    split = tmp_path / "src" / "train"
    names = {"café": ["naïve.JPEG", "日本語 の 写真.JPEG", "cafe\u0301.JPEG"], "猫": ["😺.jpeg"],
             "Ωmega": ["space name.JPEG", "ß.JPEG"]}
    files: dict[str, bytes] = {}
    for cls, members in names.items():
        (split / cls).mkdir(parents=True)
        for name in members:
            files[f"{cls}/{name}"] = jpeg_bytes(rng, 30, 20)
            (split / cls / name).write_bytes(files[f"{cls}/{name}"])
    undecodable = os.fsencode(split / "猫") + b"/latin1-\xe9t\xe9.JPEG"  # a file name that is not UTF-8
    files["猫/latin1-\\xe9t\\xe9.JPEG"] = jpeg_bytes(rng, 30, 20)  # as the manifest and report show it
    with open(undecodable, "wb") as handle:
        handle.write(files["猫/latin1-\\xe9t\\xe9.JPEG"])
    dst = tmp_path / "dst"
    _build(tmp_path / "src", dst, shard_bytes=4000, max_bad=0.0)
    classes = read_classes(Location(str(dst)))
    assert classes == sorted(names)
    rows = read_manifest_rows(fsspec.filesystem("file"), str(dst))
    assert {r["source"] for r in rows} == set(files)
    by_key = {r["key"]: r for r in rows}
    shards = ShardSet.open(Location(str(dst)), "train")
    samples = SampleStream(shards, StreamConfig(shuffle_buffer=4, seed=3), threads=2).take(len(shards))
    assert {s.key for s in samples} == set(by_key)
    for sample in samples:
        source = by_key[sample.key]["source"]
        assert classes[sample.label] == source.split("/")[0], "the label names the class folder"
        assert sample.data == files[source], "the bytes of the file, unchanged"


def test_class_names_match_across_unicode_forms_between_splits(tmp_path: Path) -> None:
    """A train split with decomposed folder names (macOS: NFD) and a val split with composed ones (NFC)
    number their classes alike; classes.json holds the NFC names; the files are read by their own names."""
    rng = np.random.default_rng(6)
    nfd, nfc = ["cafe\u0301", "Zu\u0308rich"], ["café", "Zürich"]
    for split, names in (("train", nfd), ("val", nfc)):
        for name in names:
            (tmp_path / "src" / split / name).mkdir(parents=True)
            for i in range(2):
                (tmp_path / "src" / split / name / f"{i}.JPEG").write_bytes(jpeg_bytes(rng, 30, 20))
    dst = tmp_path / "dst"
    for split in ("train", "val"):
        build_shards(BuildConfig(src=str(tmp_path / "src"), dst=Location(str(dst)), split=split, workers=1))
    classes = read_classes(Location(str(dst)))
    assert classes == sorted(nfc)
    for split, names in (("train", nfd), ("val", nfc)):
        rows = read_manifest_rows(fsspec.filesystem("file"), str(dst), split)
        assert len(rows) == 4
        for row in rows:
            folder = row["source"].split("/")[0]
            assert folder in names and classes[row["label"]] == unicodedata.normalize("NFC", folder)


def test_one_class_in_two_unicode_forms_in_one_split_is_a_clear_error(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", num_classes=1, per_class=1, defects=False)
    for name in ("café", "cafe\u0301"):
        (tmp_path / "src" / "train" / name).mkdir()
    with pytest.raises(BuildError, match=r"class folders .* are the same name in two Unicode forms \(NFC and NFD\)"):
        _build(tmp_path / "src", tmp_path / "dst")


def test_class_folder_name_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    make_tree(tmp_path / "src", num_classes=2, per_class=1, defects=False)
    os.mkdir(os.fsencode(tmp_path / "src" / "train") + b"/caf\xe9")
    with pytest.raises(BuildError, match=r"class folder 'caf\\xe9' has a name that is not valid UTF-8; rename it"):
        _build(tmp_path / "src", tmp_path / "dst")


# --- damaged shards and manifests ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad-shards")
    tree = make_tree(root / "src", num_classes=3, per_class=8, defects=False, size_range=(24, 48))
    _build(tree.root, root / "good", shard_bytes=8_000)
    return root / "good"


@pytest.fixture
def dst(good: Path, tmp_path: Path) -> Path:
    """A fresh copy of a clean split (5+ shards) for one test to damage."""
    shutil.copytree(good, tmp_path / "dst")
    return tmp_path / "dst"


def _rewrite(shard: Path, edit) -> None:
    """Rewrite a shard member by member; ``edit(index, TarInfo)`` renames it in place or returns False to
    drop it. Renamed members keep their size, so the manifest's offsets still point at the same bytes."""
    out = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.TarFile(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if edit(i, member) is not False:
                tar.addfile(member, io.BytesIO(data))
    shard.write_bytes(out.getvalue())


def _stream(dst: Path, **options) -> tuple[ShardSet, SampleStream, list]:
    shards = ShardSet.open(Location(str(dst)), "train")
    stream = SampleStream(shards, StreamConfig(shuffle_buffer=6, seed=2, max_read_retries=0, **options), threads=2)
    return shards, stream, stream.take(len(shards))


def _tree_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_members_with_parent_or_absolute_paths_are_never_written_and_are_reported(
        dst: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(dst)  # where a careless extraction would write
    shard = dst / "train-000001.tar"
    renamed = {0: "../evil.jpg", 2: "/abs.jpg"}  # the first two samples' .jpg members

    def rename(i: int, member: tarfile.TarInfo) -> None:
        member.name = renamed.get(i, member.name)

    _rewrite(shard, rename)
    before = _tree_files(tmp_path.parent)
    problems = inspect(Location(str(dst))).problems
    assert "train-000001.tar: member '../evil.jpg' has a path (absolute, '..' or folders); shards hold flat " \
           "names only: never extract this shard" in problems
    assert any(p.startswith("train-000001.tar: member '/abs.jpg' has a path") for p in problems)
    shards, stream, samples = _stream(dst, shard_cache_dir=str(tmp_path / "cache"))
    victims = {shards.keys[shards.shard_starts[1]], shards.keys[shards.shard_starts[1] + 1]}
    assert len(samples) == len(shards) and not victims & {s.key for s in samples}
    assert stream.metrics.reasons["tar member does not match the manifest"] >= 2
    created = _tree_files(tmp_path.parent) - before
    assert all(tmp_path / "cache" in p.parents or p == tmp_path / "cache" for p in created), created
    assert not Path("/abs.jpg").exists() and not (dst.parent / "evil.jpg").exists()


def test_missing_cls_member_is_reported_and_the_stream_skips_what_moved(dst: Path) -> None:
    shard = dst / "train-000002.tar"
    _rewrite(shard, lambda i, member: i != 1)  # drop the first sample's .cls: later members move up
    shards = ShardSet.open(Location(str(dst)), "train")
    first = shards.keys[shards.shard_starts[2]]
    problems = inspect(Location(str(dst))).problems
    assert f"train-000002.tar: sample {first} lacks .cls" in problems
    _, stream, samples = _stream(dst)
    assert len(samples) == len(shards), "the rank still yields its planned count"
    moved = int(shards.counts[2]) - 1  # every later sample of the shard now sits 1024 bytes earlier
    assert stream.metrics.reasons["tar member does not match the manifest"] >= moved
    assert first in {s.key for s in samples}, "labels come from the manifest; the stream never needs .cls"


def test_truncated_shard_is_reported_and_its_samples_skipped_and_counted(dst: Path) -> None:
    shards = ShardSet.open(Location(str(dst)), "train")
    last = int(shards.shard_starts[3] + shards.counts[3] - 1)
    shard = dst / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: int(shards.offsets[last]) + 100])  # cut inside the last image
    problems = inspect(Location(str(dst))).problems
    assert "train-000003.tar: not a readable tar (unexpected end of data)" in problems
    _, stream, samples = _stream(dst)
    assert len(samples) == len(shards)
    m = stream.metrics
    lost = m.corrupt_samples + sum(v for k, v in m.reasons.items() if k.startswith("unreadable"))
    assert lost >= 1 and m.substituted == lost
    assert all(s.data[:2] == b"\xff\xd8" for s in samples)


def _set_labels(dst: Path, change) -> None:
    table = pq.read_table(dst / "train.parquet")
    labels = table.column("label").to_pylist()
    change(labels)
    index = table.schema.get_field_index("label")
    pq.write_table(table.set_column(index, "label", pa.array(labels, pa.int32())), dst / "train.parquet")


@pytest.mark.parametrize("label", [3, 1000, -1])
def test_label_out_of_range_is_a_clear_error(dst: Path, label: int) -> None:
    def change(labels: list[int]) -> None:
        labels[5] = label

    _set_labels(dst, change)
    key = pq.read_table(dst / "train.parquet").column("key")[5].as_py()
    with pytest.raises(DatasetError, match=rf"train\.parquet: 1 rows have a label outside 0\.\.2 \(classes\.json has 3 "
                                           rf"classes\), e.g\. row 5 \(key {key}\) has label {label}"):
        ShardSet.open(Location(str(dst)), "train")
    problems = inspect(Location(str(dst))).problems
    assert f"train.parquet: 1 labels outside 0..2 (classes.json has 3 classes), e.g. row 5 (key {key}) " \
           f"has label {label}" in problems


def test_classes_json_of_another_build_is_refused(dst: Path) -> None:
    value = json.loads((dst / "classes.json").read_text())
    value["classes"] = value["classes"][:2]
    (dst / "classes.json").write_text(json.dumps(value))
    with pytest.raises(DatasetError, match="classes.json lists 2 classes, train.dataset.json says 3"):
        ShardSet.open(Location(str(dst)), "train")


def test_shard_name_that_is_a_path_is_refused_before_any_read(dst: Path, tmp_path: Path) -> None:
    """The shard cache writes files named after the dataset info's shards: a path there would escape it."""
    value = json.loads((dst / "train.dataset.json").read_text())
    value["shards"][0]["name"] = "../../escaped.tar"
    (dst / "train.dataset.json").write_text(json.dumps(value))
    with pytest.raises(DatasetError, match=r"shard name '\.\./\.\./escaped\.tar' is not a plain \.tar file name"):
        read_info(Location(str(dst)), "train")
    with pytest.raises(DatasetError, match="train.dataset.json"):
        ShardSet.open(Location(str(dst)), "train")


def test_a_missing_split_says_what_is_there_instead(dst: Path, tmp_path: Path) -> None:
    """Nothing at the URL (a typo), other splits only (the wrong --split), a build not finished, or none."""
    with pytest.raises(DatasetError, match=r"typo: nothing is there \(no such folder or bucket, or no access"):
        read_info(Location(str(tmp_path / "typo")), "train")
    with pytest.raises(DatasetError, match=r"split 'val' is not built .*the splits there are train: choose one"):
        read_info(Location(str(dst)), "val")
    (dst / "val-000000.tar").write_bytes((dst / "train-000000.tar").read_bytes())  # a val build stopped early
    with pytest.raises(DatasetError, match=r"the build of split 'val' has not finished \(shards are there, "
                                           r"val.dataset.json is not\): rerun the same `pipeline build-shards"):
        read_info(Location(str(dst)), "val")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"split 'train' is not built \(no train.dataset.json\); run "
                                           r"`pipeline build-shards --src FOLDER --dst .*empty --split train`"):
        read_info(Location(str(tmp_path / "empty")), "train")


@pytest.mark.parametrize(("column", "value", "message"), [
    ("shard", 99, "is in shard 99, which train.dataset.json does not list"),
    ("offset", 100, "has offset 100 and size"),
    ("size", 0, "which no tar member has"),
])
def test_manifest_rows_no_build_writes_are_refused(dst: Path, column: str, value: int, message: str) -> None:
    table = pq.read_table(dst / "train.parquet")
    values = table.column(column).to_pylist()
    values[-1] = value
    index = table.schema.get_field_index(column)
    table = table.set_column(index, column, pa.array(values, table.schema.field(column).type))
    pq.write_table(table, dst / "train.parquet")
    with pytest.raises(DatasetError, match=f"train.parquet: row {len(values) - 1} .*{message}"):
        ShardSet.open(Location(str(dst)), "train")
