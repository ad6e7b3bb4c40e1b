"""Manifest parsing and validation: every kind of bad manifest is reported with its line and
column, all problems at once, before anything is trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.image_sets import parse_list_file, resolve_images
from pipeline.manifest import (
    ManifestCheck,
    ManifestError,
    ManifestRow,
    Problem,
    load_manifest,
    parse_manifest,
)


def _png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def _images(folder: Path, n: int) -> Path:
    for i in range(n):
        _png(folder / f"{i:03d}.png", i)
    return folder


def _labelled(root: Path, with_mask: bool = True) -> Path:
    _png(root / "test" / "good" / "000.png")
    _png(root / "test" / "scratch" / "000.png", 200)
    if with_mask:
        _png(root / "ground_truth" / "scratch" / "000_mask.png", 255)
    return root


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _problems(uri: str, check: ManifestCheck | None = None) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(uri, check)
    assert "nothing was trained" in str(info.value)
    return [str(p) for p in info.value.problems]


# --------------------------------------------------------------------------------------------
# valid manifests


def test_valid_manifest_resolves_relative_paths_and_overrides(tmp_path: Path) -> None:
    _images(tmp_path / "data" / "a" / "train", 5)
    _images(tmp_path / "data" / "a" / "val", 2)
    _labelled(tmp_path / "data" / "a" / "mvtec")
    _images(tmp_path / "b", 4)
    uri = _write(
        tmp_path / "m.csv",
        "Product_Line, train_uri ,val_uri,test_uri,image_size,epochs,backbone\n"
        "a,data/a/train,data/a/val,data/a/mvtec,64,3,vgg19\n"
        "\n"
        f"b,{tmp_path / 'b'},,,,,\n",
    )
    rows = load_manifest(uri)
    assert rows == [
        ManifestRow(
            line=2,
            product_line="a",
            train_uri=str(tmp_path / "data" / "a" / "train"),
            val_uri=str(tmp_path / "data" / "a" / "val"),
            test_uri=str(tmp_path / "data" / "a" / "mvtec"),
            image_size=64,
            epochs=3,
            backbone="vgg19",
        ),
        ManifestRow(line=4, product_line="b", train_uri=str(tmp_path / "b")),
    ]
    assert rows[1].to_dict()["val_uri"] is None


def test_only_selects_rows(tmp_path: Path) -> None:
    _images(tmp_path / "a", 4)
    uri = _write(tmp_path / "m.csv", "product_line,train_uri\na,a\nb,missing\n")
    rows = load_manifest(uri, ManifestCheck(only=("a",)))
    assert [r.product_line for r in rows] == ["a"]  # b's missing data is not checked
    assert _problems(uri, ManifestCheck(only=("a", "zz"))) == [
        "column '--only': 'zz' is not a product line in the manifest"
    ]


def test_list_file_train_uri(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", 5)
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(
        "# normal images\n../imgs/000.png\n" + "".join(
            f"{tmp_path / 'imgs' / f'{i:03d}.png'}\n" for i in range(1, 5)
        )
    )  # fmt: skip
    # Relative entries climbing out of the list's folder are refused by join_uri.
    with pytest.raises(ValueError, match="unsafe"):
        resolve_images(str(listing))
    listing.write_text("".join(f"{tmp_path / 'imgs' / f'{i:03d}.png'}\n" for i in range(5)))
    uri = _write(tmp_path / "m.csv", f"product_line,train_uri\na,{listing}\n")
    assert load_manifest(uri)[0].train_uri == str(listing)
    assert len(resolve_images(str(listing))) == 5


def test_csv_list_file_uses_uri_column() -> None:
    text = "label,uri\nok,s3://b/x/1.png\nok,sub/2.png\n"
    assert parse_list_file(text, "s3://b/lists/l.csv") == [
        "s3://b/x/1.png",
        "s3://b/lists/sub/2.png",
    ]


# --------------------------------------------------------------------------------------------
# bad manifests, one kind at a time


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "product_line,train_uri,colour\na,x\n",
            ["line 1, column 'colour': unknown column; allowed: product_line, train_uri, "
             "val_uri, test_uri, image_size, epochs, backbone, preset, layers, feature_norm, "
             "smoothing_sigma, image_score, topk_fraction, score_norm, global_weight, "
             "tile_overlap, tile_scale, max_tiles, tile, pixel_fpr, image_fpr"],
        ),
        ("product_line\na\n", ["line 1, column 'train_uri': required column is missing"]),
        (
            "product_line,train_uri,train_uri\na,x,y\n",
            ["line 1, column 'train_uri': duplicate column"],
        ),
        ("product_line,train_uri\na,\n", ["line 2, column 'train_uri': required value is missing"]),
        (",train_uri\n", ["line 1, column '(empty)': unknown column; allowed: product_line, "
                          "train_uri, val_uri, test_uri, image_size, epochs, backbone, preset, "
                          "layers, feature_norm, smoothing_sigma, image_score, topk_fraction, "
                          "score_norm, global_weight, tile_overlap, tile_scale, max_tiles, "
                          "tile, pixel_fpr, image_fpr",
                          "line 1, column 'product_line': required column is missing"]),
        (
            "product_line,train_uri\na,x\nb,x\na,x\n",
            ["line 4, column 'product_line': duplicate product line 'a' (first on line 2)"],
        ),
        (
            "product_line,train_uri\nmetal/plate,x\n",
            ["line 2, column 'product_line': unsafe product_line 'metal/plate': only letters, "
             "digits, '.', '_' and '-' allowed"],
        ),
        (
            "product_line,train_uri\n..,x\n",
            ["line 2, column 'product_line': unsafe product_line '..': relative path "
             "references are not allowed"],
        ),
        (
            "product_line,train_uri\n.hidden,x\n",
            ["line 2, column 'product_line': product_line '.hidden' must not start with '.' "
             "(reserved for temporary names)"],
        ),
        (
            "product_line,train_uri,image_size\na,x,100\n",
            ["line 2, column 'image_size': image_size must be a multiple of 32 and >= 32, "
             "got 100"],
        ),
        (
            "product_line,train_uri,epochs\na,x,ten\nb,x,0\n",
            ["line 2, column 'epochs': 'ten' is not an integer",
             "line 3, column 'epochs': epochs must be >= 1, got 0"],
        ),
        (
            "product_line,train_uri,backbone\na,x,resnet\n",
            ["line 2, column 'backbone': unknown backbone 'resnet'; known: vgg19, mobilenet_v2, "
             "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"],
        ),
        (
            "product_line,train_uri\na,ftp://host/x\n",
            ["line 2, column 'train_uri': unsupported URI scheme 'ftp' in 'ftp://host/x' "
             "(use s3://, file:// or a path)"],
        ),
        ("product_line,train_uri\na,x,extra\n", ["line 2: 3 fields but the header has 2"]),
        ("", ["the file is empty"]),
        ("product_line,train_uri\n", ["no product lines: the manifest has only a header"]),
    ],
)  # fmt: skip
def test_syntax_problems(tmp_path: Path, text: str, expected: list[str]) -> None:
    uri = _write(tmp_path / "m.csv", text)
    assert _problems(uri, ManifestCheck(check_data=False)) == expected


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    uri = _write(
        tmp_path / "m.csv",
        "product_line,train_uri,epochs\nok,x,1\nbad name,x,1\nc,,1\nd,x,-1\n",
    )
    problems = _problems(uri, ManifestCheck(check_data=False))
    assert [p.split(":")[0] for p in problems] == [
        "line 3, column 'product_line'",
        "line 4, column 'train_uri'",
        "line 5, column 'epochs'",
    ]


def test_data_problems(tmp_path: Path) -> None:
    _images(tmp_path / "few", 3)
    _images(tmp_path / "enough", 4)
    (tmp_path / "empty_val").mkdir()
    _labelled(tmp_path / "nomask", with_mask=False)
    uri = _write(
        tmp_path / "m.csv",
        "product_line,train_uri,val_uri,test_uri\n"
        "missing,nowhere,,\n"
        "few,few,,\n"
        "sameval,enough,enough,\n"
        "emptyval,enough,empty_val,\n"
        "nomask,enough,,nomask\n"
        "notest,enough,,enough\n",
    )
    assert _problems(uri) == [
        f"line 2, column 'train_uri': not found: {tmp_path / 'nowhere'}",
        f"line 3, column 'train_uri': {tmp_path / 'few'} holds 3 images (png/jpg/bmp/tiff), "
        "at least 4 needed",
        "line 4, column 'val_uri': is the same as train_uri: calibration needs images the model "
        "was not trained on",
        f"line 5, column 'val_uri': {tmp_path / 'empty_val'} holds 0 images (png/jpg/bmp/tiff), "
        "at least 1 needed",
        f"line 6, column 'test_uri': {tmp_path / 'nomask' / 'test' / 'scratch' / '000.png'}: "
        f"ground-truth mask {tmp_path / 'nomask' / 'ground_truth' / 'scratch' / '000_mask.png'} "
        "not found",
        f"line 7, column 'test_uri': {tmp_path / 'enough'}: no test/ folder (expected MVTec AD "
        "layout)",
    ]


def test_min_train_images_is_configurable(tmp_path: Path) -> None:
    _images(tmp_path / "five", 5)
    uri = _write(tmp_path / "m.csv", "product_line,train_uri\na,five\n")
    assert len(load_manifest(uri, ManifestCheck(min_train_images=5))) == 1
    assert "at least 6 needed" in _problems(uri, ManifestCheck(min_train_images=6))[0]
    with pytest.raises(ValueError, match="min_train_images must be >= 4"):
        ManifestCheck(min_train_images=2)


def test_missing_manifest_and_remote_relative_paths(tmp_path: Path) -> None:
    assert _problems(str(tmp_path / "absent.csv")) == ["manifest file not found"]
    with pytest.raises(ManifestError) as info:
        parse_manifest("product_line,train_uri\na,rel/dir\n", "s3://b/m.csv", base_dir=None)
    assert [str(p) for p in info.value.problems] == [
        "line 2, column 'train_uri': relative path 'rel/dir' in a remote manifest: use an "
        "absolute URI"
    ]


def test_problem_formatting() -> None:
    assert str(Problem(3, "train_uri", "bad")) == "line 3, column 'train_uri': bad"
    assert str(Problem(None, None, "bad")) == "bad"
    err = ManifestError("m.csv", [Problem(2, "epochs", "x"), Problem(3, None, "y")])
    assert str(err) == (
        "manifest m.csv: 2 problems, nothing was trained:\n"
        "  line 2, column 'epochs': x\n  line 3: y"
    )
