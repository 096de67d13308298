"""Property tests: whatever bytes a JSONL / CSV file holds, read_feedback returns rows or raises FeedbackError."""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusion_kto.data import FeedbackError, read_feedback
from diffusion_kto.data.rows import FALSE_LABELS, MAX_PROMPT_CHARS, TRUE_LABELS

SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

any_text = st.text(alphabet=st.characters(), max_size=40)  # every code point, surrogates and NUL included
labels = st.one_of(st.sampled_from(TRUE_LABELS + FALSE_LABELS), any_text, st.integers(-3, 3), st.booleans(), st.none())
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)
records = st.fixed_dictionaries(
    {"image": st.one_of(any_text, json_values), "prompt": st.one_of(any_text, json_values), "label": labels},
    optional={"extra": json_values},
)


def read_bytes_as(data: bytes, suffix: str):
    """read_feedback on a temporary file holding `data`; returns rows or the FeedbackError."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"feedback{suffix}"
        path.write_bytes(data)
        try:
            return read_feedback(path)
        except FeedbackError as err:
            assert str(path) in str(err)
            return err


def check_rows(result) -> None:
    """Rows that come back obey the row contract."""
    if isinstance(result, FeedbackError):
        return
    assert result, "an empty result must be an error"
    for row in result:
        assert isinstance(row.prompt, str) and row.prompt.strip() and len(row.prompt) <= MAX_PROMPT_CHARS
        row.prompt.encode("utf-8")
        assert isinstance(row.desirable, bool)
        assert isinstance(row.image, (bytes, Path))


@SETTINGS
@given(st.binary(max_size=400))
def test_jsonl_random_bytes(data):
    check_rows(read_bytes_as(data, ".jsonl"))


@SETTINGS
@given(st.binary(max_size=400))
def test_csv_random_bytes(data):
    check_rows(read_bytes_as(data, ".csv"))


@SETTINGS
@given(st.lists(records, min_size=1, max_size=5))
def test_jsonl_random_records(items):
    lines = [json.dumps(r, ensure_ascii=False, allow_nan=True) for r in items]
    data = "\n".join(lines).encode("utf-8", "surrogatepass")
    check_rows(read_bytes_as(data, ".jsonl"))


@SETTINGS
@given(st.lists(st.tuples(any_text, any_text, labels.map(str)), min_size=1, max_size=5))
def test_csv_random_fields(items):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "prompt", "label"])
    writer.writerows(items)
    check_rows(read_bytes_as(buffer.getvalue().encode("utf-8", "surrogatepass"), ".csv"))


@SETTINGS
@given(st.lists(st.sampled_from(['{"image": "a.png", "prompt": "p", "label": 1}', '{"image":', "[]", "}", '"x"', "nan", ""]), min_size=1, max_size=6))
def test_malformed_lines_are_named(lines):
    result = read_bytes_as("\n".join(lines).encode(), ".jsonl")
    good = '{"image": "a.png", "prompt": "p", "label": 1}'
    bad = [i for i, line in enumerate(lines, start=1) if line.strip() and line != good]
    if bad:
        assert isinstance(result, FeedbackError) and f"feedback.jsonl:{bad[0]}:" in str(result)
    elif any(lines):
        assert len(result) == lines.count(good)


@SETTINGS
@given(st.integers(MAX_PROMPT_CHARS + 1, 4 * MAX_PROMPT_CHARS), st.sampled_from([".jsonl", ".csv"]))
def test_huge_prompts_are_errors(length, suffix):
    prompt = "é" * length
    if suffix == ".jsonl":
        data = json.dumps({"image": "a.png", "prompt": prompt, "label": "like"}).encode()
    else:
        data = f"image,prompt,label\na.png,{prompt},like\n".encode()
    result = read_bytes_as(data, suffix)
    line = 2 if suffix == ".csv" else 1
    assert isinstance(result, FeedbackError) and f"feedback{suffix}:{line}:" in str(result)


@pytest.mark.parametrize("text", ['{"image": "a.png", "prompt": "' + "[" * 100_000 + '", "label": 1}', "[" * 100_000, "1" * 10_000])
def test_pathological_json(text):
    result = read_bytes_as(text.encode(), ".jsonl")
    assert isinstance(result, FeedbackError) and "feedback.jsonl:1" in str(result)


def test_lone_surrogate_prompt_is_an_error():
    result = read_bytes_as(b'{"image": "a.png", "prompt": "\\ud800", "label": 1}', ".jsonl")
    assert isinstance(result, FeedbackError) and "'prompt'" in str(result) and "unicode" in str(result)


def test_nul_in_image_path_is_an_error():
    result = read_bytes_as(b'{"image": "a\\u0000.png", "prompt": "p", "label": 1}', ".jsonl")
    assert isinstance(result, FeedbackError) and "NUL" in str(result)
