"""Conversions: Pick-a-Pic v2 → per-image feedback under every policy and tie rule, pairs ↔ feedback, official CSV."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from diffusion_kto.cli import main
from diffusion_kto.data import FeedbackError, load_image, read_feedback
from diffusion_kto.data.convert import official_csv_to_feedback, pairs_to_feedback, pickapic_to_feedback
from diffusion_kto.data.official import read_official_csv
from diffusion_kto.data.pairs import feedback_to_pairs, write_pairs
from diffusion_kto.data.policies import categorize, policy_label, resolve_policy

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLORS = {uid: (30 * i, 255 - 30 * i, 100) for i, uid in enumerate("ABCDEFGHIJ")}
# (image_0, image_1, label_0, label_1, has_label); A..J are image uids, each image has its own colour and prompt
ROWS = [
    ("A", "B", 1.0, 0.0, True),   # A wins, B loses
    ("A", "C", 1.0, 0.0, True),   # A wins again, C loses
    ("C", "D", 1.0, 0.0, True),   # C wins (so C won and lost: intermediate), D loses
    ("E", "F", 0.5, 0.5, True),   # tie
    ("E", "B", 0.0, 1.0, True),   # E loses, B wins (B: intermediate)
    ("G", "H", 0.5, 0.5, True),   # tie: G and H take part in ties only
    ("I", "J", 1.0, 0.0, False),  # unlabelled: skipped, I and J never appear
    ("F", "D", 1.0, 0.0, True),   # F wins (F: one win, one tie), D loses again
    ("A", "A", 1.0, 0.0, True),   # same image twice: skipped
    ("B", "D", 0.3, 0.7, True),   # not a Pick-a-Pic label: skipped
]
# category of each image under each tie rule
EXPECTED = {
    "neither": dict(A="win", B="intermediate", C="intermediate", D="lose", E="lose", F="win", G="tie_only", H="tie_only"),
    "win": dict(A="win", B="intermediate", C="intermediate", D="lose", E="intermediate", F="win", G="win", H="win"),
    "lose": dict(A="win", B="intermediate", C="intermediate", D="lose", E="lose", F="intermediate", G="lose", H="lose"),
}
LIKED = {"win_intermediate": {"win", "intermediate"}, "win_only": {"win"}, "win_vs_rest": {"win"}}
DISLIKED = {"win_intermediate": {"lose"}, "win_only": {"lose"}, "win_vs_rest": {"intermediate", "lose"}}


def jpeg(color) -> bytes:
    """A tiny solid-colour JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def pickapic_table(rows):
    """A pyarrow table in Pick-a-Pic v2's schema (with a few of its extra columns)."""
    columns = {
        "are_different": [a != b for a, b, *_ in rows],
        "best_image_uid": [a if l0 == 1 else b if l1 == 1 else "" for a, b, l0, l1, _ in rows],
        "caption": [f"prompt of {a}" for a, *_ in rows],
        "has_label": [h for *_, h in rows],
        "image_0_uid": [a for a, *_ in rows],
        "image_1_uid": [b for _, b, *_ in rows],
        "jpg_0": [jpeg(COLORS[a]) for a, *_ in rows],
        "jpg_1": [jpeg(COLORS[b]) for _, b, *_ in rows],
        "label_0": [l0 for _, _, l0, _, _ in rows],
        "label_1": [l1 for _, _, _, l1, _ in rows],
        "model_0": ["sd-xl"] * len(rows),
        "ranking_id": list(range(len(rows))),
    }
    return pa.table(columns)


@pytest.fixture
def pickapic(tmp_path) -> Path:
    """A Pick-a-Pic-like parquet folder: the train rows in two shards plus a test shard that must be ignored."""
    folder = tmp_path / "pickapic" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pickapic_table(ROWS[:5]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pickapic_table(ROWS[5:]), folder / "train-00001-of-00002.parquet")
    pq.write_table(pickapic_table([("J", "I", 1.0, 0.0, True)]), folder / "test-00000-of-00001.parquet")
    return tmp_path / "pickapic"


def by_uid(out: Path) -> dict[str, dict]:
    """The written feedback records keyed by image uid (the image file's stem)."""
    records = [json.loads(line) for line in (out / "feedback.jsonl").read_text().splitlines()]
    return {Path(r["image"]).stem: r for r in records}


@pytest.mark.parametrize("ties", ["neither", "win", "lose"])
@pytest.mark.parametrize("policy", ["win_intermediate", "win_only", "win_vs_rest"])
def test_pickapic_labels_for_every_policy_and_tie_rule(pickapic, tmp_path, policy, ties):
    out = tmp_path / "out"
    summary = pickapic_to_feedback(pickapic, out, policy, ties=ties)
    categories = EXPECTED[ties]
    liked = {u for u, c in categories.items() if c in LIKED[policy]}
    disliked = {u for u, c in categories.items() if c in DISLIKED[policy]}
    records = by_uid(out)
    assert {u for u, r in records.items() if r["label"] is True} == liked
    assert {u for u, r in records.items() if r["label"] is False} == disliked
    assert all(records[u]["category"] == categories[u] for u in records)
    assert (summary.liked, summary.disliked, summary.images) == (len(liked), len(disliked), 8)
    assert summary.dropped == 8 - len(liked) - len(disliked)
    assert summary.rows_read == 10
    assert summary.rows_skipped == {"unlabelled": 1, "same image twice": 1, "invalid label": 1}
    # only kept images stay on disk, and read_feedback reads the result as ordinary feedback
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(records)
    rows = read_feedback(out / "feedback.jsonl")
    assert sum(r.desirable for r in rows) == len(liked)
    assert json.loads((out / "conversion.json").read_text())["policy"] == policy


def test_pickapic_default_is_the_paper_rule_with_ties_counting_for_neither(pickapic, tmp_path):
    summary = pickapic_to_feedback(pickapic, tmp_path / "out")
    assert (summary.policy, summary.ties) == ("win_intermediate", "neither")
    assert summary.categories == {"win": 2, "intermediate": 2, "lose": 2, "tie_only": 2}
    records = by_uid(tmp_path / "out")
    assert records["E"] == {"image": "images/E.jpg", "prompt": "prompt of E", "label": False, "category": "lose",
                            "wins": 0, "losses": 1, "ties": 1}
    assert records["B"]["prompt"] == "prompt of A"  # an image keeps the caption of the row it first appeared in


def test_pickapic_images_are_the_original_bytes(pickapic, tmp_path):
    pickapic_to_feedback(pickapic, tmp_path / "out")
    assert (tmp_path / "out/images/A.jpg").read_bytes() == jpeg(COLORS["A"])
    rows = {Path(r.image).stem: r for r in read_feedback(tmp_path / "out/feedback.jsonl")}
    red, green, _ = load_image(rows["D"]).getpixel((4, 4))
    assert abs(red - COLORS["D"][0]) < 8 and abs(green - COLORS["D"][1]) < 8


def test_pickapic_single_file_limit_and_official_policy_names(pickapic, tmp_path):
    shard = pickapic / "data" / "train-00000-of-00002.parquet"
    summary = pickapic_to_feedback(shard, tmp_path / "out", "gt_label_w_l", limit=2)
    assert summary.policy == "win_only" and summary.rows_read == 2
    assert {u: r["label"] for u, r in by_uid(tmp_path / "out").items()} == {"A": True, "B": False, "C": False}


def test_pickapic_refuses_a_non_empty_output_folder(pickapic, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FeedbackError, match="not empty"):
        pickapic_to_feedback(pickapic, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    pickapic_to_feedback(pickapic, tmp_path / "empty-is-fine")


def test_pickapic_errors_name_the_problem(tmp_path):
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b"1"]}), tmp_path / "bad.parquet")
    with pytest.raises(FeedbackError, match="no column 'jpg_1'"):
        pickapic_to_feedback(tmp_path / "bad.parquet", tmp_path / "out")
    with pytest.raises(FeedbackError, match="unknown policy 'best'"):
        pickapic_to_feedback(tmp_path / "bad.parquet", tmp_path / "out2", "best")
    with pytest.raises(FeedbackError, match="no such file"):
        pickapic_to_feedback(tmp_path / "missing", tmp_path / "out3")


def test_categorize_and_policy_label():
    assert categorize(2, 0) == "win" and categorize(1, 1) == "intermediate" and categorize(0, 3) == "lose"
    assert categorize(0, 0, 2) == "tie_only" and categorize(0, 0, 2, "win") == "win"
    assert categorize(1, 0, 1, "lose") == "intermediate"
    assert policy_label("intermediate") is True and policy_label("intermediate", "win_only") is None
    assert policy_label("intermediate", "gt_label_w_il") is False and policy_label("tie_only") is None
    assert resolve_policy("gt_label_wi_l") == "win_intermediate"


# ---------------------------------------------------------------------------------------------- pairs


def write_pair_source(tmp_path) -> Path:
    """A pairs JSONL whose images are files beside it: 3 prompts, image x1 chosen once and rejected once."""
    folder = tmp_path / "src"
    (folder / "img").mkdir(parents=True)
    for i in range(6):
        (folder / "img" / f"x{i}.jpg").write_bytes(jpeg((40 * i, 0, 0)))
    pairs = [
        {"prompt": "p0", "chosen": "img/x0.jpg", "rejected": "img/x1.jpg"},
        {"prompt": "p0", "chosen": "img/x1.jpg", "rejected": "img/x2.jpg"},
        {"prompt": "p1", "chosen": "img/x3.jpg", "rejected": "img/x4.jpg"},
        {"prompt": "p2", "chosen": "img/x5.jpg", "rejected": "img/x5.jpg"},
    ]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_pairs_to_feedback_counts_and_policies(tmp_path):
    src = write_pair_source(tmp_path)
    summary = pairs_to_feedback(src, tmp_path / "out")
    labels = {(r.prompt, Path(r.image).name): r.desirable for r in read_feedback(tmp_path / "out" / "feedback.jsonl")}
    assert labels == {("p0", "x0.jpg"): True, ("p0", "x1.jpg"): True, ("p0", "x2.jpg"): False,
                      ("p1", "x3.jpg"): True, ("p1", "x4.jpg"): False}
    assert summary.rows_skipped == {"same image twice": 1}
    summary = pairs_to_feedback(src, tmp_path / "out2", "win_vs_rest")
    assert (summary.liked, summary.disliked) == (2, 3)
    assert not (tmp_path / "out2" / "images").exists()  # paths are referenced, not copied


def test_pairs_from_parquet_bytes(tmp_path):
    table = pa.table({"caption": ["a", "b"], "good": [jpeg((1, 2, 3)), jpeg((9, 9, 9))],
                      "bad": [jpeg((200, 0, 0)), jpeg((1, 2, 3))]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    summary = pairs_to_feedback(tmp_path / "pairs.parquet", tmp_path / "out", prompt_column="caption",
                                chosen_column="good", rejected_column="bad")
    # (1,2,3) is chosen for "a" and rejected for "b": different prompts, so two distinct rows
    assert (summary.liked, summary.disliked) == (2, 2)
    assert len(list((tmp_path / "out" / "images").iterdir())) == 3
    assert len(read_feedback(tmp_path / "out" / "feedback.jsonl")) == 4


def test_pairs_round_trip(tmp_path):
    src = write_pair_source(tmp_path)
    lines = src.read_text().splitlines()[2:3]  # one pair per prompt and distinct images: the round trip is exact
    lines.append(json.dumps({"prompt": "p9", "chosen": "img/x0.jpg", "rejected": "img/x2.jpg"}))
    src.write_text("\n".join(lines) + "\n")
    pairs_to_feedback(src, tmp_path / "feedback")
    pairs = feedback_to_pairs(read_feedback(tmp_path / "feedback" / "feedback.jsonl"))
    written = write_pairs(pairs, tmp_path / "pairs")
    again = [json.loads(line) for line in written.read_text().splitlines()]
    resolved = [(r["prompt"], (written.parent / r["chosen"]).resolve(), (written.parent / r["rejected"]).resolve())
                for r in again]
    original = [json.loads(line) for line in lines]
    assert resolved == [(r["prompt"], (src.parent / r["chosen"]).resolve(), (src.parent / r["rejected"]).resolve())
                        for r in original]


def fake_rows(prompt, n_liked, n_disliked):
    """FeedbackRows with byte images for one prompt."""
    from diffusion_kto.data import FeedbackRow

    return [FeedbackRow(f"{prompt}-{i}".encode(), prompt, i < n_liked, f"x[{i}]") for i in range(n_liked + n_disliked)]


def test_feedback_to_pairs_caps_and_is_deterministic():
    rows = fake_rows("a", 3, 5) + fake_rows("b", 2, 0) + fake_rows("c", 1, 1)
    pairs = feedback_to_pairs(rows, max_pairs_per_prompt=3, seed=1)
    assert [p.prompt for p in pairs] == ["a", "a", "a", "c"]
    assert all(p.chosen.desirable and not p.rejected.desirable for p in pairs)
    first = pairs[:3]
    assert len({p.chosen.image for p in first}) == 3 and len({p.rejected.image for p in first}) == 3
    assert pairs == feedback_to_pairs(rows, 3, seed=1)
    assert pairs != feedback_to_pairs(rows, 3, seed=2)  # the seed picks which of the 15 pairs of 'a' are kept
    everything = feedback_to_pairs(rows, max_pairs_per_prompt=None)
    assert len(everything) == 3 * 5 + 1
    assert len({(p.chosen.image, p.rejected.image) for p in everything}) == 16
    with pytest.raises(ValueError):
        feedback_to_pairs(rows, max_pairs_per_prompt=0)


# ---------------------------------------------------------------------------------------------- official CSV


def official_csv(tmp_path) -> Path:
    """The official layout: <root>/train_processed_v3.csv with file_name relative to <root>."""
    (tmp_path / "root" / "train").mkdir(parents=True)
    splits = ["exclusive_win", "intersections", "exclusive_lose", "exclusive_lose", "intersections"]
    lines = ["file_name,caption,split"]
    for i, split in enumerate(splits):
        (tmp_path / "root" / "train" / f"u{i}.jpg").write_bytes(jpeg((i, i, i)))
        lines.append(f'train/u{i}.jpg,"caption {i}, with a comma",{split}')
    lines.append("train/u0.jpg,,exclusive_lose")  # empty caption: skipped
    path = tmp_path / "root" / "train_processed_v3.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("win_intermediate", [True, True, False, False, True]),
        ("gt_label_wi_l", [True, True, False, False, True]),
        ("win_only", [True, None, False, False, None]),
        ("win_vs_rest", [True, False, False, False, False]),
    ],
)
def test_official_csv_policies(tmp_path, policy, expected):
    path = official_csv(tmp_path)
    rows = read_official_csv(path, policy)
    want = [(f"u{i}.jpg", label) for i, label in enumerate(expected) if label is not None]
    assert [(Path(r.image).name, r.desirable) for r in rows] == want
    assert rows[0].prompt == "caption 0, with a comma" and rows[0].image == path.parent / "train/u0.jpg"


def test_official_csv_through_read_feedback_and_convert(tmp_path):
    path = official_csv(tmp_path)
    assert [r.desirable for r in read_feedback(path)] == [True, True, False, False, True]
    assert [r.desirable for r in read_feedback(path, policy="win_only")] == [True, False, False]
    summary = official_csv_to_feedback(path, tmp_path / "out", "win_vs_rest")
    assert (summary.liked, summary.disliked, summary.rows_skipped) == (1, 4, {"empty caption": 1})
    rows = read_feedback(tmp_path / "out" / "feedback.jsonl")
    assert [r.desirable for r in rows] == [True, False, False, False, False]
    assert all(Path(r.image).is_file() for r in rows)


def test_official_csv_unknown_split(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("file_name,caption,split\na.jpg,cat,exclusive_win\nb.jpg,dog,winner\n")
    with pytest.raises(FeedbackError, match=r"x.csv:3: column 'split': unknown value 'winner'"):
        read_official_csv(path)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_convert_commands(pickapic, tmp_path, capsys):
    assert main(["convert", "pickapic", "--src", str(pickapic), "--out", str(tmp_path / "fb"), "--policy", "win_only"]) == 0
    printed = capsys.readouterr().out
    assert "8 unique images: win 2, intermediate 2, lose 2, tie only 2" in printed
    assert "policy win_only (ties: neither): 2 liked, 2 disliked, 4 dropped" in printed
    assert main(["convert", "pickapic", "--src", str(pickapic), "--out", str(tmp_path / "fb")]) == 2
    assert "not empty" in capsys.readouterr().err

    assert main(["convert", "to-pairs", "--src", str(tmp_path / "fb" / "feedback.jsonl"), "--out", str(tmp_path / "pairs")]) == 0
    assert "wrote 1 pairs" in capsys.readouterr().out  # only "prompt of E" has a liked (F) and a disliked (E) image
    assert main(["convert", "pairs", "--src", str(tmp_path / "pairs" / "pairs.jsonl"), "--out", str(tmp_path / "fb2")]) == 0
    assert "liked" in capsys.readouterr().out
    assert len(read_feedback(tmp_path / "fb2" / "feedback.jsonl")) == 2

    path = official_csv(tmp_path)
    assert main(["convert", "official-csv", "--src", str(path), "--out", str(tmp_path / "fb3")]) == 0
    assert "3 liked, 2 disliked" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- hub ids (offline)


def test_pickapic_from_a_hub_id_is_streamed(pickapic, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    table = pa.concat_tables([pq.read_table(p) for p in sorted((pickapic / "data").glob("train-*.parquet"))])
    calls = []

    def fake_load_dataset(name, split=None, streaming=False, **kwargs):
        """Stand-in for the hub: the local rows as a streamed dataset."""
        calls.append((name, split, streaming))
        return datasets.Dataset(table).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    summary = pickapic_to_feedback("yuvalkirstain/pickapic_v2", tmp_path / "out")
    assert calls == [("yuvalkirstain/pickapic_v2", "train", True)]
    assert (summary.liked, summary.disliked, summary.rows_read) == (4, 2, 10)
    assert (tmp_path / "out/images/A.jpg").read_bytes() == jpeg(COLORS["A"])


def test_pairs_from_a_hub_id_with_image_features(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Image(),
                                  "rejected": datasets.Image()})
    data = {"prompt": ["a", "b"], "chosen": [Image.new("RGB", (4, 4), (0, 0, 250))] * 2,
            "rejected": [Image.new("RGB", (4, 4), (250, 0, 0))] * 2}
    stream = datasets.Dataset.from_dict(data, features=features).to_iterable_dataset()
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: stream)
    summary = pairs_to_feedback("someone/pairs", tmp_path / "out")
    assert (summary.liked, summary.disliked) == (2, 2)
    rows = read_feedback(tmp_path / "out" / "feedback.jsonl")
    assert [load_image(r).getpixel((1, 1)) for r in rows] == [(0, 0, 250), (250, 0, 0)] * 2
