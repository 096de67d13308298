"""Every run writes a model card (<output_dir>/README.md) in the Hugging Face hub's format: YAML front matter, the
method and its settings, the data counts, evaluation results when added, a sample grid, and loading code that runs."""
import re

import yaml

from tiny import tiny_overrides
from diffusion_kto.config import load_config
from diffusion_kto.train import DiffusionKTOTrainer
from diffusion_kto.train.model_card import NO_EVAL, add_eval_results, front_matter, read_front_matter


def _card(out):
    text = (out / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def _code(body):
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_a_lora_run_writes_a_card_whose_code_loads_the_adapters(tiny_sd, feedback, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **{"lora.rank": 2, "train.max_steps": 2,
                                                                      "log.validation_steps": 2}))
    DiffusionKTOTrainer(cfg).train()
    meta, body = _card(out)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"diffusion-kto", "kto", "lora"} <= set(meta["tags"]) and meta["license"] == "other"
    assert "base_model" not in meta  # a local folder is no hub id
    assert "8 rows: 4 liked, 4 disliked" in body and "bad rows skipped (`data.on_bad_row=error`): 0" in body
    assert "| `loss.beta` | 100.0 |" in body and "| `lora.rank` | 2 |" in body
    assert "![samples](samples.png)" in body and (out / "samples.png").is_file()
    assert NO_EVAL in body
    scope = {}
    exec(_code(body), scope)  # noqa: S102  the card's own code, on the tiny base and this run
    assert scope["pipe"].get_list_adapters()["unet"]


def test_a_full_run_card_loads_the_trained_unet_and_names_skipped_rows(tiny_sd, tmp_path):
    from tiny import write_bad_feedback

    data, out = write_bad_feedback(tmp_path / "d"), tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, data, out, **{
        "train.max_steps": 1, "data.on_bad_row": "skip", "log.validation_every": 1,
        "log.validation_prompts": "[a red circle]", "log.validation_steps": 2}))
    DiffusionKTOTrainer(cfg).train()
    meta, body = _card(out)
    assert "full-fine-tune" in meta["tags"]
    assert "8 rows: 4 liked, 4 disliked" in body and "bad rows skipped (`data.on_bad_row=skip`): 4 (" in body
    assert "![samples](validation/step-00000001.png)" in body and not (out / "samples.png").exists()
    scope = {}
    exec(_code(body), scope)  # noqa: S102
    assert scope["unet"].config.sample_size == 8 and scope["pipe"].unet is scope["unet"]


def test_front_matter_names_a_hub_base_model_and_the_toy_models_license(tmp_path):
    hub = load_config(None, ["model.pretrained=stable-diffusion-v1-5/stable-diffusion-v1-5", "lora.rank=4"])
    meta = front_matter(hub, lora=True)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" and meta["license"] == "other"
    toy = front_matter(load_config(None, ["model.pretrained=toy"]), lora=False)
    assert "base_model" not in toy and toy["license"] == "apache-2.0"  # from the shipped weights' own card


def test_eval_results_go_into_the_card_and_replace_their_earlier_block(tiny_sd, feedback, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny_sd, feedback, out, **{"lora.rank": 2, "train.max_steps": 1,
                                                                      "log.validation_steps": 2}))
    DiffusionKTOTrainer(cfg).train()
    assert add_eval_results(out, "dkto demo", "| a | b |\n|---|---|\n| 1 | 2 |") == out / "README.md"
    add_eval_results(out, "dkto eval (toy prompts)", "win rate 60%")
    add_eval_results(out, "dkto demo", "win rate 81%")
    meta, body = _card(out)
    assert meta["library_name"] == "diffusers" and NO_EVAL not in body
    assert body.count("### dkto demo") == 1 and "win rate 81%" in body and "| 1 | 2 |" not in body
    assert "### dkto eval (toy prompts)\n\nwin rate 60%" in body
    assert add_eval_results(tmp_path, "x", "y") is None  # no card there
    assert read_front_matter(tmp_path / "missing.md") == {}
