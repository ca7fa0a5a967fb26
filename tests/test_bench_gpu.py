"""``python -m trainer.bench_gpu`` (issue 8's one-GPU benchmark): every row runs on the CPU at CI size, in a
process where Ray, MLflow, webdataset, s3fs and moto cannot be imported (the lent GPU machines have none of
them); the table it prints and writes holds every section, and its verdicts follow the numbers."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.bench_gpu import MODELS, GpuRow, peak_flops, verdicts

pytestmark = [pytest.mark.dali, pytest.mark.slow]

BLOCK = ("ray", "mlflow", "webdataset", "s3fs", "moto")


def test_the_whole_suite_runs_without_ray_mlflow_or_s3_packages(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n")
    code = textwrap.dedent(f"""
        import sys
        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCK!r}:
                    raise ImportError("not on the GPU machine: " + name)
        sys.meta_path.insert(0, Blocked())
        from trainer.bench_gpu import main
        sys.exit(main(["--quick", "--write", {str(out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = proc.stdout
    for model in MODELS:
        assert re.search(rf"^\| model only \| {model} \| [\d,]+ \|", table, re.M), model
    for model in ("cait_xxs24", "cait_s24"):  # CaiT's attention through the fused call, and its ratio
        assert re.search(rf"^\| model only \| {model}, sdpa talking heads \| [\d,]+ \|", table, re.M), model
        assert re.search(rf"^\| {model}: sdpa talking heads, eager / timm eager step \| [\d.]+ \| 2\.00 \|",
                         table, re.M)
    for source in ("cache", "online"):
        for repeats in (3, 1):
            assert f"| full pipeline | deit_s_distill, {source} teacher, x{repeats} |" in table
    assert "| peers | deit_b_distill, online teacher, timm+PIL |" in table
    assert re.search(r"^\| full pipeline \| deit_s_distill, replay cache teacher, x3 \| [\d,]+ \| [\d.]+% \|.*"
                     r"its cache of 6 crops per image built in", table, re.M), "the replay row ran"
    assert re.search(r"^\| DALI alone \| outputs on torch's stream \(check\) \| - \|.*copy out behind 0 ms of "
                     r"queued GPU work: [\d.]+ ms with outputs on torch's stream \(run_graph\), [\d.]+ ms "
                     r"host-synchronous \|$", table, re.M)
    assert "| DALI alone | decode + RRC, the whole image decoded (the row above decodes the crop alone) |" in table
    assert table.count("| DALI alone |") == 6 and table.count("| batch augmentation | RandAugment alone") == 3
    assert "full pipeline (cache, x3) / model only" in table
    assert re.search(r"^\| remote teacher \| send path, no Ray \| [\d,]+ \| - \| - \| - \| "
                     r".*a send; 4 sent, the first and the last checked: 2 intact \|$", table, re.M)  # --quick: 2 timed
    assert "| batch augmentation | DALI stock rand_augment n=2 m=9 (baseline) | " in table
    assert "RandAugment: ours (timm's semantics) / DALI stock rand_augment" in table
    for where in ("on the training thread", "in the background"):  # --quick: 2 timed steps, one checkpoint
        row = re.search(rf"^\| checkpoints \| deit_b_distill, checkpoints {where} \| [\d,]+ \|.*"
                        rf"every 1 steps, (\d+) MB each to local disk; 1 written, [\d.]+ s each", table, re.M)
        assert row and int(row[1]) > 0, where
        assert re.search(rf"^\| deit_b_distill: checkpoints {where} / none.* \| [\d.]+ \| - \| - \|$", table, re.M)
    profile = re.search(r"^\| profile \| deit_s_distill, cache teacher, x3, profiled \| [\d,]+ \| .*CPU \(no GPU\) "
                        r"ms per step: augment ([\d.]+), teacher ([\d.]+), student ([\d.]+), optimizer ([\d.]+); "
                        r"top: \S+ \d+%", table, re.M)
    assert profile and float(profile[3]) > 0 and float(profile[4]) > 0, "the step's phases are not in the profile"
    assert "distillery.student" in Path(f"{out}.profile.txt").read_text()  # the profiler's whole table
    for row in ("resnet10t@32 cache build, whole job", "resnet10t@32 cache build", "resnet10t@32 bf16 inference alone"):
        assert re.search(rf"^\| teacher \| {re.escape(row)} \| [\d,]+ \|", table, re.M), row
    assert re.search(r"^\| resnet10t@32 cache build / its bf16 inference alone \(issue 4\) \| [\d.]+ \| 0\.90 \|",
                     table, re.M)
    written = out.read_text()
    assert written.startswith("# Benchmarks\n") and "## `python -m trainer.bench_gpu` (" in written
    assert table.strip() in written
    partial = Path(f"{out}.partial").read_text()  # rewritten after every row: what a killed run leaves
    assert "(partial: the run was still going)" in partial
    sections = ("| model only |", "| full pipeline |", "| peers |", "| DALI alone |", "| batch augmentation |",
                "| checkpoints |", "| profile |")
    measured = [line for line in table.splitlines() if line.startswith(sections)]
    assert len(measured) > 10 and all(line in partial for line in measured)


def test_peaks_and_verdicts() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("Some GPU") is None
    assert peak_flops("NVIDIA H100 NVL") == peak_flops("NVIDIA H200 NVL") == 835e12  # not the SXM parts' peak
    rows = [GpuRow("model only", "deit_s_distill", 5000.0, 0.0), GpuRow("model only", "cait_s24", 700.0),
            GpuRow("model only", "cait_s24 compiled", 1500.0),
            GpuRow("model only", "cait_s24, sdpa talking heads", 1050.0),
            GpuRow("model only", "cait_s24, sdpa talking heads compiled", 2100.0),
            GpuRow("full pipeline", "deit_s_distill, cache teacher, x3", 4800.0, 0.02),
            GpuRow("peers", "deit_s_distill, online teacher, timm+PIL", 2000.0, 0.3),
            GpuRow("model only", "cait_xxs24 compiled", 1500.0),
            GpuRow("model only", "cait_xxs24, whole model compiled", 1560.0),
            GpuRow("full pipeline", "deit_s_distill, online teacher, x3", 2000.0, 0.01),
            GpuRow("full pipeline", "deit_s_distill, online teacher compiled, x3", 2500.0, 0.01)]
    text = "\n".join(verdicts(rows))
    assert re.search(r"deit_s_distill: full pipeline, cached teacher.*\| 4,800 \| 4,700 \| met \|", text)
    assert re.search(r"its data wait \| 2\.0% \| <= 5\.0% \| met \|", text)
    assert re.search(r"/ model only \| 0\.96 \| 0\.95 \| met \|", text)
    assert re.search(r"/ peers' stack \| 2\.40 \| - \| - \|", text)
    assert re.search(r"deit_s_distill: online teacher compiled / eager \(x3\) \| 1\.25 \| - \| - \|", text)
    assert re.search(r"cait_xxs24: compiled per block / whole model compiled \(step rate\) \| 0\.96 \| - \|", text)
    assert re.search(r"cait_s24: compiled / timm eager step \| 2\.14 \| 2\.00 \| met \|", text)
    assert re.search(r"cait_s24: sdpa talking heads, eager / timm eager step \| 1\.50 \| 2\.00 \| missed \|", text)
    assert re.search(r"cait_s24: sdpa talking heads, compiled / timm eager step \| 3\.00 \| 2\.00 \| met \|", text)
    assert "deit_b_distill" not in text, "no row, no verdict"
    online_only = verdicts([GpuRow("full pipeline", "deit_b_distill, online teacher, x3", 1000.0),
                            GpuRow("full pipeline", "deit_b_distill, online teacher compiled, x3", 1500.0)])
    assert any("deit_b_distill: online teacher compiled / eager (x3) | 1.50 |" in line for line in online_only)
    slow = verdicts([GpuRow("full pipeline", "deit_b_distill, cache teacher, x3", 2000.0, 0.2)])
    assert any("2,000 | 3,000 | missed" in line for line in slow)
    assert any("20.0% | <= 5.0% | missed" in line for line in slow)


def test_the_default_batch_keeps_every_step_even_and_an_odd_one_is_refused() -> None:
    """Mixup/CutMix pairs the views of a step, so they must be even at repeats 3 (a batch of 256 views is
    85 images, 255 views) and at repeats 1: the default is a multiple of 6, anything else is refused."""
    from pipeline.loader import plan_batch
    from trainer.bench_gpu import _parser, main

    batch = _parser().parse_args([]).batch
    assert all(plan_batch(batch, 1, k) * k % 2 == 0 and plan_batch(batch, 1, k) * k == batch for k in (1, 3))
    with pytest.raises(SystemExit, match=r"--batch 256: must be a multiple of 6.*e\.g\. --batch 252"):
        main(["--batch", "256", "--models", "", "--pipeline-models", ""])


def test_a_failing_row_is_reported_and_the_rest_still_run() -> None:
    import time

    from trainer.bench_gpu import _Rows

    rows = _Rows(deadline=time.monotonic() + 60)
    rows.add("model only", "broken", lambda: 1 / 0)
    rows.add("model only", "fine", lambda: GpuRow("model only", "fine", 10.0))
    rows.run()
    late = _Rows(deadline=time.monotonic() - 1)
    late.add("peers", "late", lambda: GpuRow("peers", "late", 1.0))
    late.run()
    from trainer.bench_gpu import DALI_STOCK_RA, table

    tabled = _Rows(deadline=time.monotonic() + 30, on_row=lambda so_far: table("partial", so_far))
    tabled.add("batch augmentation", "RandAugment alone, chunk default",
               lambda: GpuRow("batch augmentation", "RandAugment alone, chunk default", 5.0))
    tabled.add("batch augmentation", DALI_STOCK_RA, lambda: 1 / 0)  # a failed baseline: no ratio, no crash
    tabled.add("model only", "after", lambda: GpuRow("model only", "after", 1.0))
    tabled.run()
    assert [r.name for r in tabled.rows][-1] == "after" and "failed" in tabled.rows[1].note
    assert "RandAugment: ours" not in table("t", tabled.rows)
    seen: list[int] = []
    short = _Rows(deadline=time.monotonic() + 30, on_row=lambda so_far: seen.append(len(so_far)))
    short.add("model only", "a compile", lambda: GpuRow("model only", "a compile", 1.0), min_seconds=120)
    short.add("model only", "quick", lambda: GpuRow("model only", "quick", 1.0))
    short.run()
    assert "not run" in short.rows[0].note and short.rows[1].views_per_s == 1.0 and seen == [1, 2]
    assert [r.name for r in rows.rows] == ["broken", "fine"] and rows.rows[1].views_per_s == 10.0
    assert rows.rows[0].views_per_s is None and rows.rows[0].note.startswith("failed: ZeroDivisionError")
    assert late.rows[0].views_per_s is None and "not run" in late.rows[0].note


@pytest.mark.s3
def test_the_pipeline_rows_through_the_local_s3_store() -> None:
    """With s3fs and moto importable (carried to the GPU machine as .s3wheels), DeiT-S distilled also
    reads its shards through moto's S3 server on 127.0.0.1, at repeats 3 and 1."""
    proc = subprocess.run([sys.executable, "-m", "trainer.bench_gpu", "--quick", "--s3", "--models", "",
                           "--pipeline-models", "deit_s_distill"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for repeats in (3, 1):
        assert re.search(rf"^\| full pipeline \| deit_s_distill, cache teacher, x{repeats}, S3 \| [\d,]+ \| [\d.]+% \|",
                         proc.stdout, re.M), proc.stdout
    assert "shards (S3 (moto on 127.0.0.1))" in proc.stdout and "failed" not in proc.stdout


def test_rows_run_by_priority_and_print_in_table_order() -> None:
    """What the goals need runs first (a run cut short by --max-seconds loses the rest); the table keeps
    its sections' order, and a partial table shows the rows measured so far in that order."""
    import time

    from trainer.bench_gpu import FIRST, GOAL, LAST, _Rows

    ran: list[str] = []
    partials: list[list[str]] = []

    def row(name: str):
        def measure() -> GpuRow:
            ran.append(name)
            return GpuRow("s", name, 1.0)
        return measure

    rows = _Rows(deadline=time.monotonic() + 30, on_row=lambda so_far: partials.append([r.name for r in so_far]))
    rows.add("s", "spare", row("spare"), priority=LAST)
    rows.add("s", "goal", row("goal"), priority=GOAL)
    rows.add("s", "build", row("build"), priority=FIRST)
    rows.add("s", "compile", row("compile"), priority=GOAL, min_seconds=1e9)  # never fits: "not run"
    assert [r.name for r in rows.run()] == ["spare", "goal", "build", "compile"]
    assert ran == ["build", "goal", "spare"] and "not run" in rows.rows[3].note
    assert partials == [["build"], ["goal", "build"], ["goal", "build", "compile"],
                        ["spare", "goal", "build", "compile"]]


def test_an_object_store_that_does_not_start_fails_the_s3_rows_and_not_the_suite(tmp_path: Path) -> None:
    """The store starts inside the first S3 row (here it cannot: its state folder would be under a file);
    that row and the other S3 row fail, the rest are measured, and closing a store never started is fine."""
    import time

    from trainer.bench_gpu import _Rows, _StoreCopy

    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    store = _StoreCopy(not_a_folder, shards=None)
    rows = _Rows(deadline=time.monotonic() + 30)
    for repeats in (3, 1):
        rows.add("full pipeline", f"x{repeats}, S3", lambda: GpuRow("full pipeline", "S3", len(store.shard_set())))
    rows.add("full pipeline", "x3", lambda: GpuRow("full pipeline", "x3", 1.0))
    first, second, local = rows.run()
    store.close()
    assert first.views_per_s is None and first.note.startswith(("failed: NotADirectoryError", "failed: FileExists"))
    assert second.views_per_s is None and "failed: RuntimeError: the local S3 store is not there" in second.note
    assert local.views_per_s == 1.0


def test_max_seconds_counts_from_started_at(tmp_path: Path) -> None:
    """scripts/gpu_bench.sh passes its own start: the minutes spent unpacking DALI count against
    --max-seconds, so past it no row starts (and each says so)."""
    import time

    from trainer.bench_gpu import main

    out = tmp_path / "BENCHMARKS.md"
    args = ["--quick", "--models", "deit_ti", "--pipeline-models", "", "--no-s3", "--write", str(out)]
    assert main([*args, "--max-seconds", "600", "--started-at", str(time.time() - 601)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| model only |")]
    assert rows and all("not run: --max-seconds reached" in line for line in rows), rows
    out.unlink()
    assert main([*args, "--max-seconds", "600", "--started-at", str(time.time() - 60)]) == 0
    assert re.search(r"^\| model only \| deit_ti \| [\d,]+ \|", out.read_text(), re.M)


def test_gpu_bench_sh_without_dali_still_measures_the_other_rows(tmp_path: Path) -> None:
    """On the GPU machine a DALI part that did not arrive (or a broken one) must cost the DALI rows, not
    the whole call: scripts/gpu_bench.sh goes on, says why in gpu.txt, and the table has the rest."""
    import os

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part00").write_bytes(b"not a tar")  # what a lost or cut part looks like
    blocker = tmp_path / "blocker"  # this interpreter has DALI; the GPU machine's python3 has not
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class Blocked:
            def find_spec(self, name, path=None, target=None):
                if name == "nvidia.dali" or name.startswith("nvidia.dali."):
                    raise ImportError("DALI is not installed on this machine")
        sys.meta_path.insert(0, Blocked())
    """))
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(blocker), "GPU_BENCH_TMP": str(tmp_path), "OUT": str(out)}
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_bench.sh"), "", "--quick", "--models", "deit_ti",
                           "--pipeline-models", "", "--no-s3"], capture_output=True, text=True, env=env, timeout=600)
    log = out / "bench_gpu.log"
    assert proc.returncode == 0, proc.stderr[-4000:] + (log.read_text()[-4000:] if log.exists() else "")
    assert log.exists(), f"gpu_bench.sh stopped before the benchmark: {proc.stderr[-4000:]}"
    said = (out / "gpu.txt").read_text()
    assert "installing DALI from the parts" in said and "DALI does not import" in said, said
    table = (out / "BENCHMARKS-gpu.md").read_text()
    assert re.search(r"^\| model only \| deit_ti \| [\d,]+ \|", table, re.M), table
    assert re.search(r"^\| DALI alone \| .* \| - \|.*failed: .*DALI", table, re.M), table
