"""The one relative-URI rule: where a relative entry of a table points, and what it may not do."""

from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.feedback import load_feedback
from pipeline.image_sets import parse_list_file
from pipeline.manifest import ManifestError, load_manifest


@pytest.mark.parametrize(
    ("entry", "folder", "expected"),
    [
        ("a/b.png", "s3://bucket/lists", "s3://bucket/lists/a/b.png"),
        ("./a//b.png", "/data/lists", "/data/lists/a/b.png"),
        ("a\\b.png", "/data", "/data/a/b.png"),
        ("s3://other/x.png", "/data", "s3://other/x.png"),
        ("/abs/x.png", "s3://bucket", "/abs/x.png"),
        ("~/x.png", "/data", "~/x.png"),  # the home folder: absolute
        ("a b.png", "/", "/a b.png"),  # any file name; only the way out is refused
    ],
)
def test_resolve_relative(entry: str, folder: str, expected: str) -> None:
    assert storage.resolve_relative(entry, folder) == expected


@pytest.mark.parametrize("entry", ["../x.png", "a/../../x.png", "a/..", "..\\x.png"])
def test_climbing_out_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match=r"unsafe list entry .*\('\.\.'\) are not allowed"):
        storage.resolve_relative(entry, "/data", "list entry")


def test_folder_of() -> None:
    assert storage.folder_of("s3://bucket/lists/l.csv") == "s3://bucket/lists"
    assert storage.folder_of("/data/l.csv") == "/data"


def test_every_table_follows_the_rule(tmp_path) -> None:
    """List files, manifests and feedback tables all refuse ``..`` through the same rule."""
    with pytest.raises(ValueError, match="relative path references"):
        parse_list_file("../x.png\n", "s3://bucket/lists/l.txt")
    (tmp_path / "m.csv").write_text("product_line,train_uri\na,../elsewhere\n")
    with pytest.raises(ManifestError, match="relative path references"):
        load_manifest(str(tmp_path / "m.csv"))
    (tmp_path / "f.csv").write_text("image_uri,product_line,label\n../x.png,a,defect\n")
    with pytest.raises(ValueError, match="relative path references"):
        load_feedback(str(tmp_path / "f.csv"), {"a"})


def test_labelled_listing_follows_the_rule(tmp_path) -> None:
    from pipeline.evaluation import list_labelled_listing
    from pipeline.mvtec_remote import LabelledSetError

    listing = tmp_path / "sets" / "labelled.csv"
    listing.parent.mkdir()
    listing.write_text("image_uri,label,mask_uri\nimgs/a.png,defect,masks/a.png\nb.png,normal,\n")
    samples = list_labelled_listing(str(listing), None)
    assert [(s.image_uri, s.mask_uri) for s in samples] == [
        (str(tmp_path / "sets" / "imgs" / "a.png"), str(tmp_path / "sets" / "masks" / "a.png")),
        (str(tmp_path / "sets" / "b.png"), None),
    ]
    listing.write_text("image_uri,label,mask_uri\na.png,defect,../../m.png\n")
    with pytest.raises(LabelledSetError, match="line 2, column 'mask_uri': unsafe mask_uri"):
        list_labelled_listing(str(listing), None)
