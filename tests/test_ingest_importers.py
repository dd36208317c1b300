"""File importers and the `continual ingest` send loop, against the real app (FastAPI test client)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ingestutil import image_bytes, image_settings, make_client, vector_settings

from continual.cli.ingest import format_report, send_all
from continual.client import Client
from continual.ingest.importers import ImportFormatError, Item, Skipped, open_source, sample_id


def items(path: Path, **kw: bool) -> list[Item | Skipped]:
    return list(open_source(path, **kw).items)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for label, n in (("cat", 3), ("dog", 2)):
        (root / label / "sub").mkdir(parents=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(image_bytes(seed=i + 10 * len(label)))
    (root / "dog" / "sub" / "x.JPG").write_bytes(image_bytes(fmt="JPEG", mode="L"))
    (root / "dog" / "notes.txt").write_text("hello")
    (root / "dog" / ".hidden.png").write_bytes(b"ignored")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return root


def test_imagefolder_reads_labels_from_directories(tree: Path) -> None:
    src = open_source(tree)
    assert src.kind == "imagefolder" and src.total == 8
    got = list(src.items)
    ok = {it.where: it.sample["label"] for it in got if isinstance(it, Item)}
    assert ok == {
        "cat/0.png": "cat",
        "cat/1.png": "cat",
        "cat/2.png": "cat",
        "cat/broken.png": "cat",
        "dog/0.png": "dog",
        "dog/1.png": "dog",
        "dog/sub/x.JPG": "dog",
    }
    assert [(s.where, "not a .png" in s.reason) for s in got if isinstance(s, Skipped)] == [("dog/notes.txt", True)]
    # Ids are stable across runs and change with content.
    again = {it.where: it.sample["id"] for it in items(tree) if isinstance(it, Item)}
    assert again == {it.where: it.sample["id"] for it in got if isinstance(it, Item)}
    (tree / "cat" / "0.png").write_bytes(image_bytes(seed=99))
    changed = {it.where: it.sample["id"] for it in items(tree) if isinstance(it, Item)}
    assert changed["cat/0.png"] != again["cat/0.png"] and changed["cat/1.png"] == again["cat/1.png"]


def test_npz_vectors_and_images(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.arange(12, dtype=np.float64).reshape(3, 4), y=np.array([0.0, 1.0, 2.0]))
    got = items(p)
    assert [it.sample["label"] for it in got] == ["0", "1", "2"]  # type: ignore[union-attr]
    assert got[1].sample["x"] == [4.0, 5.0, 6.0, 7.0]  # type: ignore[union-attr]
    q = tmp_path / "img.npz"
    np.savez(q, x=np.zeros((2, 5, 7), dtype=np.uint8), y=np.array(["cat", "dog"]))
    imgs = items(q, images=True)
    assert [it.sample["label"] for it in imgs] == ["cat", "dog"]  # type: ignore[union-attr]
    assert "image" in imgs[0].sample  # type: ignore[union-attr]
    with pytest.raises(ImportFormatError, match="uint8"):
        open_source(p, images=True)


@pytest.mark.parametrize(
    ("arrays", "words"),
    [({"x": np.zeros((2, 4))}, "needs arrays 'x' and 'y'"), ({"x": np.zeros((2, 4)), "y": np.zeros(3)}, "same length")],
)
def test_npz_shape_problems(tmp_path: Path, arrays: dict[str, np.ndarray], words: str) -> None:
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)  # type: ignore[arg-type]
    with pytest.raises(ImportFormatError, match=words):
        open_source(p)


def test_npz_refuses_pickles_and_garbage(tmp_path: Path) -> None:
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}], dtype=object), y=np.array([1]))
    with pytest.raises(ImportFormatError, match="cannot read"):
        open_source(p)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ImportFormatError, match="cannot read"):
        open_source(tmp_path / "junk.npz")


def test_csv_vectors_with_bad_rows_and_given_ids(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text("f1,label,f2,id\n1,cat,2,\n3,dog,x,\n,cat,1,\n5,,6,\n7,dog,8,mine\ninf,cat,1,\n")
    src = open_source(p)
    assert src.total == 6
    got = src.items
    got_list = list(got)
    assert [(type(it).__name__, it.where) for it in got_list] == [
        ("Item", "d.csv line 2"),
        ("Skipped", "d.csv line 3"),
        ("Skipped", "d.csv line 4"),
        ("Skipped", "d.csv line 5"),
        ("Item", "d.csv line 6"),
        ("Skipped", "d.csv line 7"),
    ]
    assert got_list[0].sample["x"] == [1.0, 2.0] and got_list[0].sample["id"].startswith("csv:d.csv:2:")  # type: ignore[union-attr]
    assert got_list[4].sample["id"] == "mine"  # type: ignore[union-attr]
    assert "'f2': 'x' is not a number" in got_list[1].reason  # type: ignore[union-attr]
    assert got_list[3].reason == "empty label"  # type: ignore[union-attr]


def test_csv_with_an_image_column(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(image_bytes())
    p = tmp_path / "d.csv"
    p.write_text("image,label,camera\na.png,cat,front\nmissing.png,dog,\n")
    got = items(p)
    assert got[0].sample["metadata"] == {"camera": "front"} and "image" in got[0].sample  # type: ignore[union-attr]
    assert isinstance(got[1], Skipped) and "missing.png" in got[1].reason


@pytest.mark.parametrize(("name", "words"), [("x.txt", "unknown format"), ("nope.csv", "no such file")])
def test_unknown_inputs(tmp_path: Path, name: str, words: str) -> None:
    if name.endswith(".txt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ImportFormatError, match=words):
        open_source(tmp_path / name)
    (tmp_path / "noheader.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ImportFormatError, match="'label' column"):
        open_source(tmp_path / "noheader.csv")


def test_long_locations_still_give_valid_ids() -> None:
    sid = sample_id("file", "d/" * 300, "cat", b"x")
    assert len(sid) <= 255 and sid.startswith("file:")


def test_send_all_resumes_and_reports_rejections(tree: Path, tmp_path: Path) -> None:
    http, store, _ = make_client(
        image_settings(tmp_path, model={"classes": ["cat", "dog"]}), f"sqlite:///{tmp_path / 's.db'}"
    )
    client = Client(str(http.base_url), http=http, retries=0)
    first = send_all(open_source(tree).items, client, batch_size=3)
    # broken.png is refused by the server; the rest of its batch still goes in.
    assert (first.accepted, first.duplicates) == (6, 0)
    assert sorted(w for w, _ in first.rejected) == ["cat/broken.png", "dog/notes.txt"]
    assert store.count() == 6
    second = send_all(open_source(tree).items, client, batch_size=4)
    assert (second.accepted, second.duplicates, len(second.rejected)) == (0, 6, 2)
    assert store.count() == 6
    text = format_report(second)
    assert text.startswith("accepted 0, duplicates 6, rejected 2") and "cat/broken.png: image: corrupt" in text


def test_send_all_splits_batches_over_the_server_limit(tmp_path: Path) -> None:
    s = vector_settings(tmp_path, ingest={"max_batch_samples": 2})
    http, store, _ = make_client(s, f"sqlite:///{tmp_path / 's.db'}")
    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.default_rng(0).normal(size=(7, 4)), y=np.array(["cat", "dog"] * 3 + ["bird"]))
    report = send_all(open_source(p).items, Client(str(http.base_url), http=http, retries=0), batch_size=5)
    assert (report.accepted, report.rejected) == (7, [])
    assert store.count() == 7


def test_cli_reports_unusable_paths_without_a_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "continual.cli", "ingest", str(tmp_path / "x.bin"), "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
