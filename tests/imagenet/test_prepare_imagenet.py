"""scripts/prepare_imagenet.py on fake official archives (devkit, Kaggle CSV, train tar)."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "prepare_imagenet.py"
# (ILSVRC2012_ID, WNID): the devkit's ids are not in sorted-WNID order
SYNSETS = [(1, "n02119789"), (2, "n02100735"), (3, "n01440764")]
VAL_TRUTH = [3, 1, 1, 2, 3, 2, 3]  # ILSVRC2012_ID of validation image 1, 2, ...


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_imagenet", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = load_script()


def jpeg_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 8, 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def val_name(index: int) -> str:
    return f"ILSVRC2012_val_{index:08d}.JPEG"


def write_val_tar(path: Path, count: int = len(VAL_TRUTH)) -> None:
    with tarfile.open(path, "w") as tar:
        for index in range(1, count + 1):
            add_bytes(tar, val_name(index), jpeg_bytes(10 * index))


def write_devkit(path: Path) -> None:
    """A devkit .tar.gz with meta.mat (3 leaf synsets + 1 parent) and the ground truth."""
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(SYNSETS) + 1, 1), dtype=fields)
    for row, (ilsvrc_id, wnid) in enumerate(SYNSETS):
        synsets[row, 0] = (ilsvrc_id, wnid, f"class {wnid}", 0)
    synsets[len(SYNSETS), 0] = (1001, "n00000001", "a parent synset", 3)
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    truth = "".join(f"{i}\n" for i in VAL_TRUTH).encode()
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)


def expected_layout() -> dict[str, set[str]]:
    wnid_of = dict(SYNSETS)
    layout: dict[str, set[str]] = {}
    for index, ilsvrc_id in enumerate(VAL_TRUTH, start=1):
        layout.setdefault(wnid_of[ilsvrc_id], set()).add(val_name(index))
    return layout


def layout_of(folder: Path) -> dict[str, set[str]]:
    return {d.name: {f.name for f in d.iterdir()} for d in folder.iterdir() if d.is_dir()}


def test_val_archive_and_devkit_become_wnid_folders(tmp_path: Path) -> None:
    write_val_tar(tmp_path / "ILSVRC2012_img_val.tar")
    write_devkit(tmp_path / "ILSVRC2012_devkit_t12.tar.gz")
    status = prepare.main(
        [
            "val",
            "--images",
            str(tmp_path / "ILSVRC2012_img_val.tar"),
            "--devkit",
            str(tmp_path / "ILSVRC2012_devkit_t12.tar.gz"),
            "--out",
            str(tmp_path / "imagenet"),
        ]
    )
    assert status == 0
    assert layout_of(tmp_path / "imagenet" / "val") == expected_layout()
    image = Image.open(tmp_path / "imagenet" / "val" / "n01440764" / val_name(1))
    assert image.size == (8, 6)


def test_flat_folder_and_kaggle_csv_become_symlinked_wnid_folders(tmp_path: Path) -> None:
    flat = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    flat.mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    wnid_of = dict(SYNSETS)
    for index, ilsvrc_id in enumerate(VAL_TRUTH, start=1):
        (flat / val_name(index)).write_bytes(jpeg_bytes(index))
        wnid = wnid_of[ilsvrc_id]
        rows.append(f"{val_name(index)[:-5]},{wnid} 1 2 30 40 {wnid} 5 6 7 8")
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    out = tmp_path / "imagenet"
    status = prepare.main(
        ["val", "--images", str(flat), "--kaggle-csv", str(csv_path), "--out", str(out)]
        + ["--mode", "symlink"]
    )
    assert status == 0
    assert layout_of(out / "val") == expected_layout()
    assert (out / "val" / "n01440764" / val_name(1)).is_symlink()


def test_train_archive_of_class_archives_becomes_wnid_folders(tmp_path: Path) -> None:
    outer_path = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer_path, "w") as outer:
        for _, wnid in SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for k in range(2):
                    add_bytes(class_tar, f"{wnid}_{k}.JPEG", jpeg_bytes(k))
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    status = prepare.main(["train", "--images", str(outer_path), "--out", str(tmp_path / "in")])
    assert status == 0
    assert layout_of(tmp_path / "in" / "train") == {
        wnid: {f"{wnid}_0.JPEG", f"{wnid}_1.JPEG"} for _, wnid in SYNSETS
    }


def test_an_image_without_a_label_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_val_tar(tmp_path / "val.tar", count=len(VAL_TRUTH) + 1)
    write_devkit(tmp_path / "devkit.tar.gz")
    status = prepare.main(
        ["val", "--images", str(tmp_path / "val.tar"), "--devkit", str(tmp_path / "devkit.tar.gz")]
        + ["--out", str(tmp_path / "out")]
    )
    assert status == 2
    error = capsys.readouterr().err
    assert "1 validation images have no label" in error and error.count("\n") == 1


def test_verify_lists_undecodable_files_and_fails(tmp_path: Path) -> None:
    folder = tmp_path / "root" / "val" / "n01440764"
    folder.mkdir(parents=True)
    (folder / "good.JPEG").write_bytes(jpeg_bytes(7))
    (folder / "bad.JPEG").write_bytes(b"\xff\xd8 truncated")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "verify", str(tmp_path / "root"), "--workers", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 1
    assert run.stdout.splitlines()[0].startswith(str(folder / "bad.JPEG"))
    assert "checked 2 images, 1 do not decode" in run.stderr
    (folder / "bad.JPEG").unlink()
    assert prepare.main(["verify", str(tmp_path / "root"), "--workers", "1"]) == 0
