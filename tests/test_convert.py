"""The conversion library and tools: golden split statistics, counts, bad input, crash safety, resume, layouts."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dnet_fast.convert import (
    GOLDEN,
    ConversionError,
    ConvertOptions,
    ImageOptions,
    ShardReader,
    check_golden,
    convert,
    read_split,
    read_splits,
    split_file_input,
    verify_output,
)
from dnet_fast.data.groups import group_sizes
from tests.places_tree import (
    BAD_KINDS,
    REPAIRED_KINDS,
    SPLITS_DIR,
    build_tree,
    class_color,
    make_bad,
    needs_splits,
)

REPO = Path(__file__).resolve().parents[1]
WDS = ConvertOptions(image=ImageOptions(max_side=80), formats=("wds",), shard_size=8, progress=False)


def _convert(tree, out: Path, opts: ConvertOptions = WDS, layout: str = "auto"):
    splits = read_splits(tree.lists, 365)
    return convert(split_file_input("places_lt", tree.root, splits, layout), out, opts)


@pytest.fixture
def tree(tmp_path):
    return build_tree(tmp_path)


@needs_splits
def test_golden_statistics_of_the_real_split_files():
    lists = {s: SPLITS_DIR / f"Places_LT_{s}.txt" for s in ("train", "val", "test")}
    splits = read_splits(lists, 365)
    assert check_golden(splits, GOLDEN["places_lt"]) == []
    counts = np.bincount(splits["train"].labels)
    assert (len(splits["train"].entries), counts.max(), counts.min()) == (62_500, 4_980, 5)
    assert group_sizes(counts) == {"many": 131, "medium": 163, "few": 71}
    assert all(not s.problems for s in splits.values())
    val = read_split(SPLITS_DIR / "ImageNet_LT_val.txt", 1000)
    assert len(val.entries) == 20_000
    assert set(np.bincount(val.labels)) == {20}


def test_golden_check_reports_mismatches(tree):
    errors = check_golden(read_splits(tree.lists, 365), GOLDEN["places_lt"])
    assert any(e.startswith("train images: expected 62500") for e in errors)


def test_counts_labels_and_pixels_match_the_split_files(tree, tmp_path):
    result = _convert(tree, tmp_path / "out")
    meta = verify_output(tmp_path / "out")
    listed = {s: [line.rsplit(" ", 1) for line in lines] for s, lines in tree.lines.items()}
    original = sorted({int(y) for _, y in listed["train"]})
    assert [c["original_id"] for c in meta["classes"]] == original
    assert [c["name"] for c in meta["classes"]][:2] == ["airfield", "airplane_cabin"]
    for split, rows in listed.items():
        assert meta["splits"][split]["images"] == len(rows)
        want = np.bincount([original.index(int(y)) for _, y in rows], minlength=len(original))
        assert meta["class_counts"][split] == want.tolist()
        tsv = (tmp_path / "out" / f"{split}.samples.tsv").read_text().splitlines()[1:]
        assert [t.split("\t")[2] for t in tsv] == [p for p, _ in rows]  # file order kept
        reader = ShardReader([tmp_path / "out" / t for t in meta["splits"][split]["shards"]])
        labels = reader.labels()
        assert labels.tolist() == [original.index(int(y)) for _, y in rows]
        for i in (0, len(reader) - 1):  # pixels come from the listed file: its class colour survives JPEG
            with Image.open(io.BytesIO(reader.image_bytes(i))) as img:
                red = np.asarray(img.convert("RGB"))[..., 0].mean()
            assert abs(red - class_color(original[labels[i]])[0]) < 4
    assert meta["groups"] == {"many": 0, "medium": 0, "few": 5}
    assert {"report.json", "train.samples.tsv", "train-000000.tar", "train-000000.idx"} <= set(meta["files"])
    assert result.skipped == []
    assert not result.verified


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_input_stops_naming_file_and_line(tree, tmp_path, kind):
    line, rel = make_bad(tree, kind)
    with pytest.raises(ConversionError) as err:
        _convert(tree, tmp_path / "out")
    assert f"Places_LT_train.txt:{line} " in str(err.value)
    assert rel in str(err.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_split_file_accepts_crlf_and_bom_and_diagnoses_extra_columns(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\xef\xbb\xbfa/x.jpg 1\r\nb/y.jpg 2\r\n\r\nc/z.jpg 3 4\nd/w.jpg 1\rx\n")
    split = read_split(lst, 10)
    assert [(e.path, e.label, e.line) for e in split.entries] == [("a/x.jpg", 1, 1), ("b/y.jpg", 2, 2)]
    assert [(p.kind, p.where) for p in split.problems] == [
        ("malformed", "list.txt:4 c/z.jpg 3 4"),
        ("malformed", "list.txt:5 d/w.jpg 1 x"),
    ]
    assert str(split.problems[0]).endswith("malformed: expected '<path> <label>', got 3 columns")
    assert "CR-only line ends" in split.problems[1].detail


def test_crlf_lists_convert_like_lf_and_a_split_without_images_leaves_nothing(tree, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    from convert_places_lt import main

    assert main(_tool_args(tree, tmp_path / "lf")) == 0
    for lst in tree.lists.values():
        lst.write_bytes(lst.read_bytes().replace(b"\n", b"\r\n"))
    assert main([*_tool_args(tree, tmp_path / "crlf"), "--skip-bad"]) == 0
    lf, crlf = (json.loads((tmp_path / d / "meta.json").read_text())["files"] for d in ("lf", "crlf"))
    assert {k: v for k, v in crlf.items() if k.endswith(".tar")} == {
        k: v for k, v in lf.items() if k.endswith(".tar")
    }
    capsys.readouterr()
    # Every val line has an extra column: with --skip-bad the val split would be empty.
    tree.lists["val"].write_text("".join(f"{line} 0\n" for line in tree.lines["val"]))
    out = tmp_path / "out"
    for formats in ("wds", "wds,ffcv"):
        assert main([*_tool_args(tree, out), "--skip-bad", "--formats", formats]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: split 'val' has no usable image (first bad entry: Places_LT_val.txt:1 ")
        assert "expected '<path> <label>', got 3 columns" in err
        assert "\n" not in err
        assert not out.exists()  # validated before anything is written: no report.json, no samples.tsv


def test_written_json_is_valid_and_meta_json_carries_its_digest(tmp_path):
    from dnet_fast.atomic import atomic_write_json
    from dnet_fast.convert import array_input
    from dnet_fast.data.shards import load_meta
    from dnet_fast.shardformat import ShardDataError

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))

    atomic_write_json(
        tmp_path / "x.json", {"a": float("nan"), "b": [1.5, float("-inf")], "c": np.float64("inf")}
    )
    assert strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [1.5, None], "c": None}
    rng = np.random.default_rng(0)
    arrays = {
        s: (rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 0, 1]))
        for s in ("train", "val", "test")
    }
    inp = array_input("tiny", arrays, ("a", "b"), {"ratio": float("nan")})
    opts = ConvertOptions(image=ImageOptions(max_side=0, mode="raw"), formats=("wds",), progress=False)
    out = tmp_path / "out"
    result = convert(inp, out, opts)
    meta = strict((out / "meta.json").read_text())
    strict((out / "report.json").read_text())
    assert meta["provenance"]["ratio"] is None
    assert meta == result.meta
    with pytest.raises(ValueError, match="raw_fraction"):
        ConvertOptions(raw_fraction=float("nan"))
    # meta.json itself is covered by its digest: an edited class count is refused, naming the file.
    text = (out / "meta.json").read_text()
    (out / "meta.json").write_text(text.replace('"train": [\n   2,', '"train": [\n   3,', 1))
    assert (out / "meta.json").read_text() != text
    with pytest.raises(ShardDataError, match=r"meta\.json: content differs from the digest"):
        load_meta(out)


@pytest.mark.parametrize("kind", REPAIRED_KINDS)
def test_repairable_images_are_converted_or_refused_when_strict(tree, tmp_path, kind):
    line, _ = make_bad(tree, kind)
    result = _convert(tree, tmp_path / "ok")
    assert [r["where"].split(" ")[0] for r in result.repaired] == [f"Places_LT_train.txt:{line}"]
    reader = ShardReader([tmp_path / "ok" / t for t in result.meta["splits"]["train"]["shards"]])
    with Image.open(io.BytesIO(reader.image_bytes(len(reader) - 1))) as img:
        assert img.mode == "RGB"
        assert max(img.size) <= 80
    strict = ConvertOptions(image=ImageOptions(max_side=80, strict=True), formats=("wds",), progress=False)
    with pytest.raises(ConversionError, match=f"Places_LT_train.txt:{line} "):
        _convert(tree, tmp_path / "strict", strict)


def test_skip_bad_lists_every_skipped_entry(tree, tmp_path):
    clean = sum(len(v) for v in tree.lines.values())
    lines = {kind: make_bad(tree, kind)[0] for kind in (*BAD_KINDS, *REPAIRED_KINDS)}
    opts = ConvertOptions(
        image=ImageOptions(max_side=80),
        formats=("wds",),
        shard_size=8,
        progress=False,
        skip_bad=True,
        workers=2,
    )
    result = _convert(tree, tmp_path / "out", opts)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    skipped = {int(s["where"].split(" ")[0].split(":")[1]) for s in report["skipped"]}
    assert skipped == {lines[k] for k in BAD_KINDS}
    assert len(report["repaired"]) == len(REPAIRED_KINDS)
    assert sum(s["images"] for s in result.meta["splits"].values()) == clean + len(REPAIRED_KINDS)


_KILLER = """
import os, signal, sys
from dnet_fast import shardformat
real_add = shardformat.ShardWriter.add
def add(self, key, ext, data, label):
    if int(key) == {kill_at}:  # mid-shard: the temporary tar is half written
        os.kill(os.getpid(), signal.SIGKILL)
    real_add(self, key, ext, data, label)
shardformat.ShardWriter.add = add
sys.path.insert(0, {tools!r})
from convert_places_lt import main
sys.exit(main(sys.argv[1:]))
"""


def _tool_args(tree, out: Path) -> list[str]:
    return [
        "--root",
        str(tree.root),
        "--out",
        str(out),
        "--no-golden",
        "--formats",
        "wds",
        "--max-side",
        "80",
        "--shard-size",
        "8",
        "--workers",
        "0",
        "--no-progress",
        *(a for s in ("train", "val", "test") for a in (f"--{s}-list", str(tree.lists[s]))),
    ]


def test_killed_conversion_leaves_nothing_accepted_and_resumes(tree, tmp_path):
    out = tmp_path / "out"
    script = _KILLER.format(kill_at=12, tools=str(REPO / "tools"))
    proc = subprocess.run(
        [sys.executable, "-c", script, *_tool_args(tree, out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "train-000001.tar.tmp").exists()
    assert (out / "train-000000.tar").exists()
    with pytest.raises(ConversionError, match="did not finish"):
        verify_output(out)
    from dnet_fast.data.shards import load_meta

    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_meta(out)
    first = (out / "train-000000.tar").stat().st_mtime_ns
    # A shard renamed into place but never journaled (killed between rename and journal) is not trusted either.
    shutil.copy(out / "train-000000.tar", out / "train-000005.tar")
    sys.path.insert(0, str(REPO / "tools"))
    from convert_places_lt import main

    assert main(_tool_args(tree, out)) == 0
    meta = verify_output(out)
    assert (out / "train-000000.tar").stat().st_mtime_ns == first  # resumed: the complete shard was kept
    assert not list(out.glob("*.tmp"))
    assert not (out / "train-000005.tar").exists()
    assert main(_tool_args(tree, tmp_path / "clean")) == 0
    clean = json.loads((tmp_path / "clean" / "meta.json").read_text())
    tars = {k: v for k, v in meta["files"].items() if k.endswith((".tar", ".idx"))}
    assert tars == {k: v for k, v in clean["files"].items() if k.endswith((".tar", ".idx"))}


def test_rerun_verifies_detects_damage_and_refuses_other_arguments(tree, tmp_path):
    out = tmp_path / "out"
    _convert(tree, out)
    assert _convert(tree, out).verified
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])  # damaged after conversion
    with pytest.raises(ConversionError, match="train-000001.tar"):
        verify_output(out)
    result = _convert(tree, out)
    assert not result.verified
    assert verify_output(out)
    other = ConvertOptions(image=ImageOptions(max_side=64), formats=("wds",), progress=False)
    with pytest.raises(ConversionError, match="other inputs or arguments"):
        _convert(tree, out, other)


def test_places365_data_256_layout_gives_identical_shards(tree, tmp_path):
    _convert(tree, tmp_path / "oltr")
    p365 = tmp_path / "p365"
    for rel in {line.rsplit(" ", 1)[0] for lines in tree.lines.values() for line in lines}:
        top, cls, name = rel.split("/")
        dest = (
            p365 / "val_256" / name
            if top == "val"
            else p365 / "data_256" / cls[0] / cls.replace("-", "/") / name
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tree.root / rel, dest)
    tree.root = p365
    result = _convert(tree, tmp_path / "out365")
    assert set(result.meta["provenance"]["layouts"].values()) == {"places365"}
    a = json.loads((tmp_path / "oltr" / "meta.json").read_text())["files"]
    assert {k: v for k, v in a.items() if k.endswith(".tar")} == {
        k: v for k, v in result.meta["files"].items() if k.endswith(".tar")
    }


def test_tool_golden_check_and_exit_codes(tree, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    from convert_places_lt import main

    args = [a for a in _tool_args(tree, tmp_path / "out") if a != "--no-golden"]
    assert main(args) == 2
    assert "train images: expected 62500, got 30" in capsys.readouterr().err
    make_bad(tree, "corrupt")
    assert main(_tool_args(tree, tmp_path / "out")) == 1
    assert main([*_tool_args(tree, tmp_path / "out"), "--skip-bad"]) == 0
    assert "skipped 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Split files are asked for explicitly: --split-dir or --<split>-list (dnet-fast convert, tools/ wrappers)


def test_missing_split_files_end_in_one_line_and_nothing_written(tree, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_places_lt.py"), "--root", str(tree.root), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one line, no traceback
    for needle in ("--split-dir", "--train-list", "Places_LT_train.txt", "Difficulty_Net", "golden", "62,500"):
        assert needle in proc.stderr
    assert not out.exists()


@needs_splits
def test_imagenet_lt_names_the_train_list_it_expects(tmp_path, capsys):
    from dnet_fast.cli import main

    out = tmp_path / "out"
    base = ["convert", "imagenet-lt", "--root", str(tmp_path), "--out", str(out), "--split-dir", str(SPLITS_DIR)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "train split file not found" in err
    assert "115,846 lines" in err
    assert "a063f095fcd475db4cf8b0658c4b73955535bbf9" in err
    train = tmp_path / "ImageNet_LT_train.txt"  # a list of the wrong length: refused by the golden check
    train.write_text("train/n01440764/n01440764_10026.JPEG 0\n")
    assert main([*base, "--train-list", str(train)]) == 2
    err = capsys.readouterr().err
    assert "train images: expected 115846, got 1" in err
    assert "train list git blob: expected a063f095fcd475db4cf8b0658c4b73955535bbf9" in err
    assert not out.exists()


def test_split_dir_and_the_list_converter(tree, tmp_path, capsys):
    from dnet_fast.cli import main

    common = ["--root", str(tree.root), "--formats", "wds", "--max-side", "80", "--workers", "0", "--no-progress"]
    places = ["convert", "places-lt", "--split-dir", str(tree.lists["train"].parent), "--no-golden"]
    assert main([*places, "--out", str(tmp_path / "places"), *common]) == 0
    own = tmp_path / "lists"  # a user's own lists: train.txt, val.txt, test.txt
    own.mkdir()
    for split, path in tree.lists.items():
        shutil.copy(path, own / f"{split}.txt")
    assert main(["convert", "list", "--split-dir", str(own), "--dataset", "mini", "--out", str(tmp_path / "own"),
                 *common]) == 0
    assert "golden" not in capsys.readouterr().out  # no golden check unless asked
    a, b = verify_output(tmp_path / "places"), verify_output(tmp_path / "own")
    assert (a["dataset"], b["dataset"]) == ("places_lt", "mini")
    assert {k: v for k, v in a["files"].items() if k.endswith(".tar")} == {
        k: v for k, v in b["files"].items() if k.endswith(".tar")
    }
    asked = ["convert", "list", "--split-dir", str(own), "--golden", "places_lt", "--out", str(tmp_path / "no")]
    assert main([*asked, *common]) == 2
    assert "train images: expected 62500, got 30" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_ffcv_output_without_ffcv_fails_before_writing_and_auto_skips_it(tree, tmp_path, monkeypatch, capsys):
    from dnet_fast.cli import main
    from dnet_fast.convert import beton

    monkeypatch.setattr(beton, "ffcv_available", lambda: False)
    opts = ConvertOptions(image=ImageOptions(max_side=80), formats=("wds", "ffcv"), progress=False, workers=0)
    with pytest.raises(ConversionError, match="ffcv is not installed"):
        _convert(tree, tmp_path / "out", opts)
    assert not (tmp_path / "out").exists()  # checked first: no shards written, then refused
    out = tmp_path / "auto"
    argv = ["convert", "places-lt", "--split-dir", str(tree.lists["train"].parent), "--no-golden", "--root",
            str(tree.root), "--out", str(out), "--max-side", "80", "--workers", "0", "--no-progress"]
    assert main(argv) == 0  # --formats auto: WebDataset shards only, and it says so
    assert "formats: wds only" in capsys.readouterr().out
    assert verify_output(out)["splits"]["train"]["beton"] is None
