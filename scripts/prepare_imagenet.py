#!/usr/bin/env python3
"""Turn the official ImageNet-1k (ILSVRC2012) files into the ``train/<wnid>/``, ``val/<wnid>/``
layout that ``data=imagenet`` and ``data=imagenet_dali`` read, and check images decode.

Subcommands::

    # validation: the flat archive (or an already-extracted flat folder) + its labels, from the
    # official devkit or Kaggle's LOC_val_solution.csv
    python scripts/prepare_imagenet.py val --images ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet
    python scripts/prepare_imagenet.py val --images ILSVRC/Data/CLS-LOC/val \\
        --kaggle-csv LOC_val_solution.csv --out /data/imagenet --mode symlink

    # training: the archive of 1000 per-class archives
    python scripts/prepare_imagenet.py train --images ILSVRC2012_img_train.tar --out /data/imagenet

    # list files that do not decode (DALI aborts on them without naming them); exit 1 if any
    python scripts/prepare_imagenet.py verify /data/imagenet --workers 16

Archives are streamed (no temporary flat copy). Output names are the archive's base names, so
nothing is written outside ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import Pool
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfac_train.data.imagenet import DECODE_ERRORS, load_rgb

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEVKIT_META = "data/meta.mat"
DEVKIT_VAL_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"


class PrepareError(Exception):
    """A user-facing problem with the input files (printed as one line, exit status 2)."""


# ----------------------------------------------------------------------------- labels


def _val_file_name(index: int) -> str:
    """Official name of validation image ``index`` (1-based)."""
    return f"ILSVRC2012_val_{index:08d}.JPEG"


def _read_devkit_files(devkit: Path) -> tuple[bytes, bytes]:
    """(meta.mat bytes, validation ground-truth bytes) from a devkit archive or folder."""
    if devkit.is_dir():
        matches = {
            name: sorted(devkit.rglob(Path(name).name)) for name in (DEVKIT_META, DEVKIT_VAL_TRUTH)
        }
        for name, found in matches.items():
            if not found:
                raise PrepareError(f"devkit folder {str(devkit)!r} has no {name}")
        return matches[DEVKIT_META][0].read_bytes(), matches[DEVKIT_VAL_TRUTH][0].read_bytes()
    if not devkit.is_file():
        raise PrepareError(f"devkit not found: {str(devkit)!r}")
    wanted: dict[str, bytes] = {}
    with tarfile.open(devkit, "r:*") as tar:
        for member in tar:
            for name in (DEVKIT_META, DEVKIT_VAL_TRUTH):
                if member.isfile() and member.name.endswith(name):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    wanted[name] = handle.read()
    missing = [name for name in (DEVKIT_META, DEVKIT_VAL_TRUTH) if name not in wanted]
    if missing:
        raise PrepareError(f"devkit archive {str(devkit)!r} lacks {missing}")
    return wanted[DEVKIT_META], wanted[DEVKIT_VAL_TRUTH]


def labels_from_devkit(devkit: Path) -> dict[str, str]:
    """Validation file name → wnid, from the official ILSVRC2012 devkit (tar.gz or folder).

    ``meta.mat`` maps ILSVRC2012_ID (1..1000 for the leaf synsets) to WNID; line ``i`` of the
    ground-truth file is the ILSVRC2012_ID of validation image ``i``.
    """
    from scipy.io import loadmat

    meta_bytes, truth_bytes = _read_devkit_files(devkit)
    synsets = loadmat(io.BytesIO(meta_bytes), squeeze_me=True)["synsets"]
    id_to_wnid = {
        int(ilsvrc_id): str(wnid)
        for ilsvrc_id, wnid, num_children in zip(
            synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"], strict=True
        )
        if int(num_children) == 0
    }
    labels: dict[str, str] = {}
    for index, line in enumerate(truth_bytes.decode().split(), start=1):
        class_id = int(line)
        if class_id not in id_to_wnid:
            raise PrepareError(f"ground truth line {index} has unknown ILSVRC2012_ID {class_id}")
        labels[_val_file_name(index)] = id_to_wnid[class_id]
    return labels


def labels_from_kaggle_csv(csv_path: Path) -> dict[str, str]:
    """Validation file name → wnid from Kaggle's ``LOC_val_solution.csv``.

    Rows are ``ImageId,PredictionString`` where the prediction string is
    ``wnid x0 y0 x1 y1 [wnid x0 y0 x1 y1 ...]`` (boxes of one class per image).
    """
    if not csv_path.is_file():
        raise PrepareError(f"label file not found: {str(csv_path)!r}")
    labels: dict[str, str] = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(
            reader.fieldnames
        ):
            raise PrepareError(
                f"{str(csv_path)!r} is not LOC_val_solution.csv "
                "(expected columns ImageId,PredictionString)"
            )
        for row in reader:
            tokens = row["PredictionString"].split()
            if not tokens:
                raise PrepareError(f"{str(csv_path)!r}: no label for {row['ImageId']!r}")
            labels[f"{row['ImageId']}.JPEG"] = tokens[0]
    return labels


# ----------------------------------------------------------------------------- writing


def _safe_name(name: str) -> str:
    base = os.path.basename(name)
    if base in ("", ".", "..") or "\\" in base:
        raise PrepareError(f"refusing odd file name in the input: {name!r}")
    return base


def _write(stream: IO[bytes], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(stream, out, length=1 << 20)
    os.replace(tmp, dest)


def _iter_tar_files(tar: tarfile.TarFile) -> Iterator[tuple[str, IO[bytes]]]:
    for member in tar:
        if member.isfile():
            handle = tar.extractfile(member)
            assert handle is not None
            yield member.name, handle


def place_val_images(images: Path, labels: dict[str, str], out_dir: Path, mode: str) -> Counter:
    """Write every validation image to ``out_dir/<wnid>/<name>``; return images per wnid.

    ``images`` is the official tar or a flat folder (``mode`` copy/move/symlink for folders).
    Every image must have a label, and every label an image.
    """
    placed: Counter = Counter()
    unlabelled: list[str] = []

    def place(name: str, write: Callable[[Path], None]) -> None:
        base = _safe_name(name)
        if not base.lower().endswith(IMAGE_SUFFIXES):
            return
        wnid = labels.get(base)
        if wnid is None:
            unlabelled.append(base)
            return
        write(out_dir / wnid / base)
        placed[wnid] += 1

    if images.is_dir():
        for path in sorted(images.iterdir()):
            if not path.is_file():
                continue

            def write(dest: Path, src: Path = path) -> None:
                dest.parent.mkdir(parents=True, exist_ok=True)
                if mode == "copy":
                    shutil.copy2(src, dest)
                elif mode == "move":
                    shutil.move(src, dest)
                else:
                    if dest.is_symlink() or dest.exists():
                        dest.unlink()
                    dest.symlink_to(src.resolve())

            place(path.name, write)
    elif images.is_file():
        with tarfile.open(images, "r|*") as tar:
            for name, handle in _iter_tar_files(tar):
                place(name, lambda dest, h=handle: _write(h, dest))
    else:
        raise PrepareError(f"validation images not found: {str(images)!r}")

    if unlabelled:
        raise PrepareError(
            f"{len(unlabelled)} validation images have no label (e.g. {unlabelled[0]!r}); "
            "is the label file for ILSVRC2012?"
        )
    missing = len(labels) - sum(placed.values())
    if missing:
        raise PrepareError(f"{missing} labelled validation images were not found in {images}")
    return placed


def extract_train_archive(archive: Path, out_dir: Path) -> Counter:
    """Stream ``ILSVRC2012_img_train.tar`` (one ``<wnid>.tar`` per class) into
    ``out_dir/<wnid>/``; return images per wnid."""
    if not archive.is_file():
        raise PrepareError(f"training archive not found: {str(archive)!r}")
    placed: Counter = Counter()
    with tarfile.open(archive, "r|*") as outer:
        for name, handle in _iter_tar_files(outer):
            base = _safe_name(name)
            if not base.endswith(".tar"):
                raise PrepareError(f"expected per-class <wnid>.tar archives, found {name!r}")
            wnid = base[: -len(".tar")]
            with tarfile.open(fileobj=handle, mode="r|*") as inner:
                for inner_name, image in _iter_tar_files(inner):
                    _write(image, out_dir / wnid / _safe_name(inner_name))
                    placed[wnid] += 1
    return placed


# ----------------------------------------------------------------------------- verify


def _check_one(path: str) -> str | None:
    try:
        load_rgb(path)
    except DECODE_ERRORS as err:
        return f"{path}\t{type(err).__name__}: {err}"
    return None


def find_undecodable(root: Path, workers: int) -> tuple[int, list[str]]:
    """(number of images checked, sorted 'path<TAB>error' lines of files that do not decode)."""
    paths = sorted(
        str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if workers > 1:
        with Pool(workers) as pool:
            results: Iterable[str | None] = pool.imap(_check_one, paths, chunksize=64)
            bad = [r for r in results if r is not None]
    else:
        bad = [r for r in map(_check_one, paths) if r is not None]
    return len(paths), sorted(bad)


# ----------------------------------------------------------------------------- CLI


def _summary(split: str, placed: Counter, out_dir: Path) -> str:
    return f"{split}: {sum(placed.values())} images in {len(placed)} class folders under {out_dir}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    val = sub.add_parser("val", help="validation images + labels -> OUT/val/<wnid>/")
    val.add_argument(
        "--images",
        type=Path,
        required=True,
        help="ILSVRC2012_img_val.tar or a flat folder of the 50k images",
    )
    labels = val.add_mutually_exclusive_group(required=True)
    labels.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12.tar.gz (or folder)")
    labels.add_argument("--kaggle-csv", type=Path, help="LOC_val_solution.csv")
    val.add_argument("--out", type=Path, required=True, help="dataset root (data.root)")
    val.add_argument(
        "--mode",
        choices=("copy", "move", "symlink"),
        default="copy",
        help="how files of a flat folder are placed (archives are extracted)",
    )

    train = sub.add_parser("train", help="ILSVRC2012_img_train.tar -> OUT/train/<wnid>/")
    train.add_argument("--images", type=Path, required=True)
    train.add_argument("--out", type=Path, required=True, help="dataset root (data.root)")

    verify = sub.add_parser("verify", help="list image files under ROOT that do not decode")
    verify.add_argument("root", type=Path)
    verify.add_argument("--workers", type=int, default=os.cpu_count() or 1)

    args = parser.parse_args(argv)
    try:
        if args.command == "val":
            label_map = (
                labels_from_devkit(args.devkit)
                if args.devkit is not None
                else labels_from_kaggle_csv(args.kaggle_csv)
            )
            out_dir = args.out / "val"
            placed = place_val_images(args.images, label_map, out_dir, args.mode)
            print(_summary("val", placed, out_dir))
        elif args.command == "train":
            out_dir = args.out / "train"
            print(_summary("train", extract_train_archive(args.images, out_dir), out_dir))
        else:
            if not args.root.is_dir():
                raise PrepareError(f"not a folder: {str(args.root)!r}")
            num_checked, bad = find_undecodable(args.root, args.workers)
            for line in bad:
                print(line)
            print(f"checked {num_checked} images, {len(bad)} do not decode", file=sys.stderr)
            return 1 if bad else 0
    except (PrepareError, tarfile.TarError) as err:
        print(f"prepare_imagenet: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
