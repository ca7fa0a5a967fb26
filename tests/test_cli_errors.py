"""Bad input at the command lines ends in one ``error:`` line naming what to fix (exit 2), not a traceback;
``DISTILLERY_DEBUG=1`` brings the traceback back."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli_errors import describe, user_errors
from pipeline.manifest import DatasetError
from trainer import recipes


def test_our_errors_keep_their_message_and_anyone_elses_are_named() -> None:
    assert describe(DatasetError("/x split 'train' is not built")) == "/x split 'train' is not built"
    assert describe(recipes.UnknownRecipe("deit_sm")).startswith("unknown recipe 'deit_sm': did you mean deit_s")
    assert (describe(FileNotFoundError(2, "No such file or directory", "w/nope.pth"))
            == "FileNotFoundError: [Errno 2] No such file or directory: 'w/nope.pth' (DISTILLERY_DEBUG=1 shows "
               "the traceback)")
    assert describe(ValueError("Protocol not known: foo")).startswith("ValueError: Protocol not known: foo (")


def test_the_debug_switch_lets_every_error_through(monkeypatch: pytest.MonkeyPatch) -> None:
    assert user_errors(DatasetError)[:3] == (DatasetError, OSError, ValueError)
    for off in ("0", "false", "no", ""):
        monkeypatch.setenv("DISTILLERY_DEBUG", off)
        assert user_errors(DatasetError)
    monkeypatch.setenv("DISTILLERY_DEBUG", "1")
    assert user_errors(DatasetError) == ()  # the command's own classes too


def test_pipeline_reports_an_unknown_url_protocol_in_one_line(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli import main

    monkeypatch.delenv("DISTILLERY_DEBUG", raising=False)
    assert main(["inspect", "foo://bucket/shards"]) == 2
    assert "ValueError: Protocol not known: foo" in caplog.text and "Traceback" not in caplog.text
    monkeypatch.setenv("DISTILLERY_DEBUG", "1")
    with pytest.raises(ValueError, match="Protocol not known"):
        main(["inspect", "foo://bucket/shards"])


@pytest.mark.parametrize("args,message", [
    (["--teacher", "regnety_16"], "teacher 'regnety_16' is not a timm model name (close: regnety_"),
    (["--teacher", "resnet10t", "--weights", "{tmp}/nope.pth"], "teacher weights {tmp}/nope.pth: no such file"),
    (["--teacher", "resnet10t", "--recipe", "deit_sm", "--views", "4"], "unknown recipe 'deit_sm'"),
])
def test_teacher_cache_build_names_a_bad_teacher_weights_or_recipe(args: list[str], message: str, tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from teacher_cache.cli import main

    argv = ["build", "--shards", str(tmp_path / "shards"), "--out", str(tmp_path / "out"), "--workers", "0"]
    assert main(argv + [a.format(tmp=tmp_path) for a in args]) == 2
    assert message.format(tmp=tmp_path) in caplog.text and "Traceback" not in caplog.text


def test_teacher_checks_run_before_any_worker_and_debug_shows_their_traceback(tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights of another architecture are found in the driver (on the meta device), with Ray workers asked
    for: the build stops before any worker starts."""
    import timm
    import torch

    from teacher_cache.cli import main
    from teacher_cache.teacher import TeacherError

    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), weights)
    argv = ["build", "--teacher", "resnet10t", "--num-classes", "10", "--weights", str(weights), "--shards",
            str(tmp_path / "none"), "--out", str(tmp_path / "out"), "--workers", "2"]
    monkeypatch.delenv("DISTILLERY_DEBUG", raising=False)
    assert main(argv) == 2
    assert "resnet18.pth does not fit ResNet:" in caplog.text and "weights have other shapes" in caplog.text
    monkeypatch.setenv("DISTILLERY_DEBUG", "1")
    with pytest.raises(TeacherError, match="not a timm model name"):
        main(argv[:2] + ["regnety_16"] + argv[3:])


def test_a_checkpoint_of_another_architecture_is_one_line_not_a_size_mismatch_dump(tmp_path: Path) -> None:
    import timm
    import torch

    from trainer.checkpoint import CheckpointError, load_pretrained

    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"resnet18.pth does not fit ResNet: \d+ weights have other shapes "
                                              r"\(e\.g\. \S+: \[[\d, ]+\] in the file, \[[\d, ]+\] in the model\)"):
        load_pretrained(timm.create_model("resnet10t", num_classes=10), str(path))


def test_trainer_refuses_a_missing_resume_checkpoint_before_ray_starts(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.main import main

    assert main(["demo_deit_tiny", f"data.train_url={tmp_path}/s", f"data.val_url={tmp_path}/s",
                 "--resume", str(tmp_path / "nockpt")]) == 2
    assert f"--resume {tmp_path}/nockpt: no such checkpoint" in capsys.readouterr().err


def test_trainer_refuses_a_teacher_checkpoint_of_another_architecture_before_ray_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import timm
    import torch

    from pipeline.build import BuildConfig, build_shards
    from pipeline.demo import write_digits_tree
    from pipeline.storage import Location
    from trainer.main import main

    write_digits_tree(tmp_path / "digits", size=16)
    for split in ("train", "val"):
        build_shards(BuildConfig(src=str(tmp_path / "digits"), dst=Location(str(tmp_path / "s")), split=split,
                                 workers=1))
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), weights)
    assert main(["demo_deit_tiny_distill", f"data.train_url={tmp_path}/s", f"data.val_url={tmp_path}/s",
                 f"distill.teacher.pretrained_path={weights}"]) == 2
    assert f"{weights} does not fit" in capsys.readouterr().err
