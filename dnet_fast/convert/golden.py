"""Recorded statistics of the official split files (SPEC §9, §10) and the check converters run against them."""

from __future__ import annotations

from dataclasses import dataclass

from dnet_fast.convert.splitfile import SplitFile, split_stats

__all__ = ["GOLDEN", "Golden", "check_golden", "summary_lines"]


@dataclass(frozen=True)
class Golden:
    """Expected numbers of one dataset's split files (None: not checked)."""

    train_images: int
    classes: int
    train_max: int
    train_min: int
    val_images: int
    test_images: int
    groups: tuple[int, int, int] | None  # many / medium / few classes
    train_blob: str | None = None  # git blob id of the official train list


GOLDEN = {
    "places_lt": Golden(
        62_500, 365, 4_980, 5, 7_300, 36_500, (131, 163, 71), "6392252f8ae867bc8a5e841cc1b29e5b8ef4b636"
    ),
    # Train numbers are the literature's (the list is user-supplied); groups 385/479/136 are unverified (SPEC §10).
    "imagenet_lt": Golden(
        115_846, 1000, 1_280, 5, 20_000, 50_000, (385, 479, 136), "a063f095fcd475db4cf8b0658c4b73955535bbf9"
    ),
}


def check_golden(splits: dict[str, SplitFile], golden: Golden) -> list[str]:
    """Compares the parsed split files with ``golden``; returns one message per mismatch (empty: all match)."""
    train = split_stats(splits["train"].labels, with_groups=True)
    got = {
        "train images": train.images,
        "classes": train.classes,
        "train max per class": train.max_per_class,
        "train min per class": train.min_per_class,
        "val images": len(splits["val"].entries) if "val" in splits else None,
        "test images": len(splits["test"].entries) if "test" in splits else None,
        "many/medium/few": tuple(train.groups.values()) if train.groups else None,
    }
    want = {
        "train images": golden.train_images,
        "classes": golden.classes,
        "train max per class": golden.train_max,
        "train min per class": golden.train_min,
        "val images": golden.val_images,
        "test images": golden.test_images,
        "many/medium/few": golden.groups,
    }
    return [
        f"{k}: expected {want[k]}, got {got[k]}" for k in want if want[k] is not None and got[k] != want[k]
    ]


def summary_lines(splits: dict[str, SplitFile]) -> list[str]:
    """Human-readable per-split statistics, as the converters print them."""
    lines = []
    for name, s in splits.items():
        st = split_stats(s.labels, with_groups=name == "train")
        groups = f", many/medium/few {'/'.join(map(str, st.groups.values()))}" if st.groups else ""
        lines.append(
            f"{name}: {st.images} images, {st.classes} classes, per class max {st.max_per_class} "
            f"min {st.min_per_class}{groups}; {len(s.problems)} bad lines"
        )
    return lines
