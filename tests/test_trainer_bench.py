"""``python -m trainer.bench``: every row on the smallest distilled demo recipe (a 2-block DeiT-Ti and a
resnet10t teacher at 32 px), 1 and 2 CPU workers through Ray Train, a few steps each; the JSON it writes
says what the table says. Timings here are not checked against the targets: CPU figures say nothing of them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

STEPS, VIEWS_PER_WORKER = 5, 30  # demo batch 64 over 2 workers = 32 views, 30 at repeats 3


def _cells(text: str, name: str) -> list[str]:
    """The printed line that starts with ``name``, split into its columns (two or more spaces apart)."""
    lines = [line for line in text.splitlines() if line.startswith(name + "  ")]
    assert len(lines) == 1, f"{name!r}: {len(lines)} lines in\n{text}"
    return re.split(r"\s{2,}", lines[0].strip())


@pytest.mark.dali
@pytest.mark.slow
def test_bench_prints_every_row_and_writes_the_same_as_json(local_ray: Any, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """One run of every row, the checkpoint rows included (--checkpoint-every 2 of 5 timed steps: two
    checkpoints per row, at steps 2 and 4, none after the last, on the training thread and in the background,
    with their cost in the rows' step time and the notes)."""
    from trainer.bench import CHECKPOINT_ROWS, TARGET, main

    out = tmp_path / "bench.json"
    code = main(["demo_deit_tiny_distill", "--steps", str(STEPS), "--warmup", "1", "--workers", "1,2",
                 "--images", "128", "--checkpoint-every", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads(out.read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["model only", "model + teacher", "full pipeline, 1 worker", "full pipeline, 2 workers",
                          CHECKPOINT_ROWS[False], CHECKPOINT_ROWS[True]]
    for name, row in rows.items():
        assert math.isfinite(row["views_per_s"]) and row["views_per_s"] > 0, row
        assert 0 <= row["data_wait"] <= 1, row
        assert row["views"] == STEPS * VIEWS_PER_WORKER * row["workers"], row  # the hook timed exactly --steps
        assert _cells(text, name)[:4] == [name, str(row["workers"]), f"{row['views_per_s']:.1f}",
                                          f"{row['data_wait']:.1%}"]
    assert "no GPU" in rows["full pipeline, 2 workers"]["note"]

    for background in (False, True):
        row = rows[CHECKPOINT_ROWS[background]]
        written = re.search(r"; (\d+) written, ([\d.]+) s writing and reporting, ([\d.]+) s of it on the training "
                            r"thread \(of which ([\d.]+) s waiting for a write still running\)", row["note"])
        assert written and int(written[1]) == 2 and float(written[2]) > 0, row["note"]
    lost = [n for n in result["notes"] if "lost" in n]
    assert len(lost) == 2 and all("per checkpoint (2 in 5 steps)" in n and "every_n_steps=1000" in n for n in lost)

    ratios = {r["name"]: r for r in result["ratios"]}
    assert ratios["checkpoints in the background / none"]["denominator"] == "model only"
    targeted = [r for r in ratios.values() if r["target"] is not None]
    assert {r["numerator"] + " / " + r["denominator"] for r in targeted} == {
        "full pipeline, 1 worker / model only", "full pipeline, 2 workers / full pipeline, 1 worker"}
    assert all(r["target"] == TARGET for r in targeted)
    for name, ratio in ratios.items():
        quotient = rows[ratio["numerator"]]["views_per_s"] / rows[ratio["denominator"]]["views_per_s"]
        assert ratio["value"] == pytest.approx(quotient, rel=1e-12)
        verdict = "-" if ratio["target"] is None else "met" if ratio["value"] >= ratio["target"] else "missed"
        assert ratio["verdict"] == verdict
        target = "-" if ratio["target"] is None else f">= {ratio['target']:.2f}"
        assert _cells(text, name) == [name, f"{ratio['value']:.3f}", target, verdict]

    assert result["title"] == text.splitlines()[:2]
    assert all(f"* {note}" in text for note in result["notes"])
    assert "random weights" in text and "say nothing about the GPU targets" in text
    assert result["settings"]["device"] == "cpu" and result["settings"]["views_per_worker"] == VIEWS_PER_WORKER


def test_rows_not_run_give_ratios_not_available() -> None:
    """A row that could not run (one GPU, two workers asked for) leaves its ratios without a value."""
    from trainer.bench import TARGET, Report, Row, _ratios

    rows = [Row("model only", 1, 200.0, 0.0), Row("model + teacher", 1, None, None, "the recipe has no teacher"),
            Row("full pipeline, 1 worker", 1, 190.0, 0.05),
            Row("full pipeline, 2 workers", 2, None, None, "not run: needs 2 GPUs, this machine has 1")]
    ratios = _ratios(rows, [1, 2])
    assert [(r.value, r.verdict) for r in ratios] == [(pytest.approx(0.95), "met"), (None, "n/a"), (None, "n/a")]
    assert ratios[0].target == TARGET
    text = Report("r", ["title"], rows, ratios, ["a note"], {}).table()
    assert _cells(text, "full pipeline, 2 workers") == ["full pipeline, 2 workers", "2", "-", "-",
                                                        "not run: needs 2 GPUs, this machine has 1"]
    assert _cells(text, "per worker: 2 workers / 1 worker") == ["per worker: 2 workers / 1 worker", "-", ">= 0.95",
                                                               "n/a"]


def test_usage_errors_exit_2_before_ray_starts(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.bench import main

    assert main(["demo_deit_tiny", "--workers", "2"]) == 2
    assert "include 1" in capsys.readouterr().err
    assert main(["demo_deit_tiny", "data.batch_size=63"]) == 2  # not a multiple of the recipe's 2 workers
    assert "multiple" in capsys.readouterr().err


def test_checkpoint_every_must_fall_inside_the_timed_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.bench import main

    assert main(["demo_deit_tiny", "--steps", "5", "--checkpoint-every", "5"]) == 2
    assert "--checkpoint-every 5" in capsys.readouterr().err
