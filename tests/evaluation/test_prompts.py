"""Prompt sets: local files with errors naming file and line, the toy set, and the paper's hub sets via a cache."""
import json
import sys

import pytest

from diffusion_kto.evaluation import prompts as P
from diffusion_kto.evaluation.prompts import PromptError, load_prompts
from diffusion_kto.toy import world


def test_txt_skips_blank_lines_and_strips(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    ps = load_prompts(str(f))
    assert ps.prompts == ["a red circle", "a blue square"] and ps.source == str(f) and ps.categories is None


def test_jsonl_objects_strings_and_categories(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat", "category": "animals"}\n"a dog"\n\n{"caption": "a car"}\n', encoding="utf-8")
    ps = load_prompts(str(f))
    assert ps.prompts == ["a cat", "a dog", "a car"]
    assert ps.categories == ["animals", None, None]


@pytest.mark.parametrize("content, line, message", [
    ('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": \n', 3, "not valid JSON"),
    ('{"prompt": "ok"}\n{"image": "x.png"}\n', 2, "no prompt field"),
    ('{"prompt": "ok"}\n{"prompt": "   "}\n', 2, "empty"),
    ('{"prompt": 3}\n', 1, "must be a string"),
    ('[1, 2]\n', 1, "expected a JSON object or string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(PromptError, match=f"bad.jsonl, line {line}: .*{message}"):
        load_prompts(str(f))


def test_csv_prompt_column_and_category(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('Prompt,Category\n"a cat, sitting",animals\na car,vehicles\n', encoding="utf-8")
    ps = load_prompts(str(f))
    assert ps.prompts == ["a cat, sitting", "a car"] and ps.categories == ["animals", "vehicles"]


def test_csv_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("image,label\nx.png,1\n", encoding="utf-8")
    with pytest.raises(PromptError, match="bad.csv, line 1: .*no prompt column"):
        load_prompts(str(f))
    f.write_text("prompt,category\na cat,x\n  ,y\n", encoding="utf-8")
    with pytest.raises(PromptError, match="bad.csv, line 3: the prompt is empty"):
        load_prompts(str(f))


def test_file_problems(tmp_path):
    with pytest.raises(PromptError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8"):
        load_prompts(str(tmp_path / "latin1.txt"))
    with pytest.raises(PromptError, match="unknown prompt set 'nonsense'.*pickapic"):
        load_prompts("nonsense")


def test_toy_set_is_the_held_out_prompts_and_limit_takes_a_prefix():
    ps = load_prompts("toy")
    assert ps.prompts == world.eval_prompts()
    assert not set(ps.prompts) & set(world.train_prompts())
    assert load_prompts("toy", limit=3).prompts == ps.prompts[:3]
    with pytest.raises(PromptError, match="at least 1"):
        load_prompts("toy", limit=0)


def test_hub_set_reads_the_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("DKTO_CACHE", str(tmp_path))
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "parti-train.json").write_text(json.dumps(
        {"source": "nateraw/parti-prompts split train", "prompts": ["a", "b", "c"], "categories": ["x", "y", "z"]}))
    monkeypatch.setitem(sys.modules, "datasets", None)  # proves nothing is downloaded
    ps = load_prompts("parti", limit=2)
    assert ps.prompts == ["a", "b"] and ps.categories == ["x", "y"] and ps.name == "parti:train"


def test_hub_set_downloads_dedupes_and_caches(tmp_path, monkeypatch):
    calls = []

    class FakeDataset(dict):
        column_names = ("caption", "jpg_0")

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset(caption=["a cat ", "a dog", "a cat"], jpg_0=[b"", b"", b""])

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    sys.modules["datasets"].load_dataset = fake_load_dataset
    ps = P.load_hub_set("pickapic", cache=tmp_path)
    assert ps.prompts == ["a cat", "a dog"]
    assert calls == [("yuvalkirstain/pickapic_v2_no_images", "test_unique")]
    again = P.load_hub_set("pickapic", cache=tmp_path)
    assert again.prompts == ps.prompts and len(calls) == 1  # second time from the cache file


def test_hps_prompts_come_from_the_hpd_benchmark_files(tmp_path, monkeypatch):
    files = {}
    for style in P.HPS_STYLES:
        files[style] = tmp_path / f"{style}.json"
        files[style].write_text(json.dumps([f"{style} prompt {i}" for i in range(2)]))
    seen = []

    def fake_download(repo, filename, subfolder=None, repo_type=None):
        seen.append((repo, subfolder, filename, repo_type))
        return str(files[filename.removesuffix(".json")])

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    ps = P.load_hub_set("hps", "photo", cache=tmp_path / "cache")
    assert ps.prompts == ["photo prompt 0", "photo prompt 1"] and ps.categories == ["photo", "photo"]
    assert seen == [("zhwang/HPDv2", "benchmark", "photo.json", "dataset")]
    assert len(P.load_hub_set("hps", cache=tmp_path / "cache")) == 8
    with pytest.raises(PromptError, match="unknown HPS v2 style 'cartoon'"):
        P.load_hub_set("hps", "cartoon", cache=tmp_path / "cache")


def test_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", type(sys)("datasets"))
    sys.modules["datasets"].load_dataset = offline
    with pytest.raises(PromptError, match="nateraw/parti-prompts.*Offline\\?.*--prompts"):
        P.load_hub_set("parti", cache=tmp_path)


def test_missing_datasets_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PromptError, match="pip install datasets"):
        P.load_hub_set("pickapic", cache=tmp_path)
