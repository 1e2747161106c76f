"""The checkpoint directory in-process: atomic writes, lineages, pruning, the order in which
``resume=auto`` tries checkpoints, the finite check and the mismatch message."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kfac_train.engine.checkpoint import (
    CheckpointDirectory,
    CheckpointInfo,
    Position,
    all_finite,
    auto_candidates,
    build_checkpoint,
    capture_rng,
    list_checkpoints,
    model_mismatch,
    read_info,
    remove_stale_temporaries,
    save_atomic,
)
from kfac_train.errors import UserError


def state(step: int, lineage: str, parent: tuple[str, int] | None = None) -> dict:
    return build_checkpoint(
        model={"w": torch.full((2,), float(step))},
        optimizer={"state": {}, "param_groups": []},
        preconditioner={"steps": step},
        scaler={},
        position=Position(step=step),
        rng=[capture_rng()],
        lineage=lineage,
        parent=parent,
        preconditioner_kind="none",
        optimizer_name="sgd",
        config_yaml="",
    )


def directory_with(tmp_path: Path, steps: list[int], keep_last: int = 0) -> CheckpointDirectory:
    """A run that wrote `steps` (lineage of its own) into `tmp_path`."""
    run = CheckpointDirectory(tmp_path, keep_last)
    run.adopt(None)
    for step in steps:
        run.write(state(step, run.lineage, run.parent), step)
    return run


def steps_of(tmp_path: Path, lineage: str) -> list[int]:
    infos = [read_info(p) for p in list_checkpoints(tmp_path)]
    return sorted(i.step for i in infos if i is not None and i.lineage == lineage)


def test_a_continued_lineage_prunes_its_own_oldest_checkpoints(tmp_path: Path):
    first = directory_with(tmp_path, [5, 10, 15])
    head = read_info(tmp_path / "step_00000015.pt")
    assert head is not None and head.step == 15 and head.lineage == first.lineage
    again = CheckpointDirectory(tmp_path, keep_last=2)
    assert again.adopt(head).startswith("continuing")
    again.write(state(20, again.lineage), 20)
    assert steps_of(tmp_path, first.lineage) == [15, 20]
    assert not list(tmp_path.glob(".*tmp"))


def test_a_rollback_starts_a_lineage_and_never_deletes_the_old_one(tmp_path: Path, caplog):
    old = directory_with(tmp_path, [5, 10, 15, 20])
    rollback = CheckpointDirectory(tmp_path, keep_last=2)
    with caplog.at_level(logging.WARNING, logger="kfac_train"):
        rollback.adopt(read_info(tmp_path / "step_00000010.pt"))
    assert "rolled back to step 10 of a run that reached step 20" in caplog.text
    assert rollback.lineage != old.lineage and rollback.parent == (old.lineage, 10)
    written = [rollback.write(state(s, rollback.lineage, rollback.parent), s) for s in (12, 15, 18)]
    assert [p.name for p in written] == [
        f"step_{s:08d}-{rollback.lineage}.pt" for s in (12, 15, 18)
    ]
    assert steps_of(tmp_path, old.lineage) == [5, 10, 15, 20]
    assert steps_of(tmp_path, rollback.lineage) == [15, 18]

    # auto continues the rollback, falls back within it past an unreadable newest checkpoint,
    # and refuses to continue the abandoned run when none of the rollback's files is readable
    def auto() -> tuple[str, int]:
        chosen = CheckpointDirectory(tmp_path, 2).choose_resume("auto")
        assert chosen is not None
        return chosen.info.lineage, chosen.info.step

    assert auto() == (rollback.lineage, 18)
    written[2].write_bytes(written[2].read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="kfac_train"):
        assert auto() == (rollback.lineage, 15)
    assert f"instead of the newest, unreadable {written[2].name}" in caplog.text
    written[1].write_bytes(b"truncated")
    with pytest.raises(UserError, match="unreadable and belongs to another run than step_00000020"):
        auto()


def test_auto_tries_the_lineage_written_last_then_its_parent_up_to_the_branch():
    def info(step: int, lineage: str, written: float, parent=None) -> CheckpointInfo:
        return CheckpointInfo(
            Path(f"{lineage}{step}"), step, lineage, parent, written, "none", None
        )

    infos = [
        info(10, "a", 1.0),
        info(20, "a", 2.0),
        info(30, "a", 3.0),
        info(15, "b", 4.0, ("a", 10)),
        info(25, "b", 5.0, ("a", 10)),
        info(40, "c", 0.5),  # an older, unrelated run
    ]
    order = [(i.lineage, i.step) for i in auto_candidates(infos)]
    assert order == [("b", 25), ("b", 15), ("a", 10)]
    assert auto_candidates([]) == []


def test_resume_settings(tmp_path: Path):
    empty = CheckpointDirectory(tmp_path / "none", keep_last=2)
    assert empty.choose_resume(None) is None and empty.choose_resume("auto") is None
    with pytest.raises(UserError, match="does not exist"):
        empty.choose_resume(str(tmp_path / "missing.pt"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "step_00000003.pt").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(UserError, match="no readable checkpoint .*step_00000003.pt"):
        CheckpointDirectory(broken, 2).choose_resume("auto")
    named = tmp_path / "best.pt"
    save_atomic(state(7, "abc"), named)
    assert CheckpointDirectory(tmp_path, 2).choose_resume(str(named)).info.step == 7  # type: ignore[union-attr]


def test_a_format_1_checkpoint_is_identified_by_its_contents(tmp_path: Path):
    legacy = state(9, "x")
    del legacy["meta"]
    save_atomic(legacy, tmp_path / "anything.pt")
    info = read_info(tmp_path / "anything.pt")
    assert info is not None and (info.step, info.lineage, info.optimizer) == (9, "", None)


def test_only_temporary_files_of_checkpoint_writes_are_removed(tmp_path: Path):
    stale = [tmp_path / ".step_00000010.pt.a1b2.tmp", tmp_path / ".step_00000020-0f.pt.z.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / "step_00000010.pt"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)


def test_all_finite_sees_nan_and_inf_in_any_tensor():
    good = [
        torch.ones(3),
        torch.tensor([3e38, -3e38]),
        torch.ones(2, dtype=torch.bfloat16),
        torch.zeros(0),
        torch.tensor([1, 2]),
    ]
    assert all_finite(good)
    assert not all_finite([*good, torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("-inf")], dtype=torch.float16), *good])
    assert all_finite([])


def test_a_model_mismatch_is_one_line_naming_the_first_keys():
    expected = {f"layer{i}.weight": torch.zeros(2, 3) for i in range(5)}
    saved = {"layer0.weight": torch.zeros(3, 3), "extra.bias": torch.zeros(1)}
    message = model_mismatch(expected, saved)
    assert message == (
        "4 missing keys (layer1.weight, layer2.weight, layer3.weight, ...); "
        "1 unexpected keys (extra.bias); "
        "1 shape mismatches (layer0.weight saved (3, 3) vs model (2, 3))"
    )
    assert model_mismatch(expected, dict(expected)) is None
