"""Scorers load tiny random-weight models through the same loaders users take, offline, and score correctly."""
import json
import sys
import types

import numpy as np
import pytest
import torch

from diffusion_kto.evaluation import scorers
from diffusion_kto.evaluation.scorers import ScorerError, parse_metric, parse_metrics
from diffusion_kto.toy import judges


def _reference_cos(folder, images, prompts):
    """cos(text, image) computed directly with transformers, independently of the scorer code."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True)
        out = model(**inputs)
    img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
    txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy(), float(model.logit_scale.detach().exp())


def test_pickscore_is_logit_scale_times_cosine(tiny_clip, images, prompts):
    score = scorers.load_pickscore(str(tiny_clip), "cpu", batch_size=4)
    values = score(images, prompts)
    cos, scale = _reference_cos(tiny_clip, images, prompts)
    assert values.shape == (6,) and values.dtype == np.float64
    np.testing.assert_allclose(values, scale * cos, rtol=1e-4, atol=1e-4)


def test_clip_score_is_100_cos_clamped(tiny_clip, images, prompts):
    values = scorers.load_clip(str(tiny_clip), "cpu")(images, prompts)
    cos, _ = _reference_cos(tiny_clip, images, prompts)
    np.testing.assert_allclose(values, 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-3)
    assert (values >= 0).all()


def test_batch_size_does_not_change_scores(tiny_clip, images, prompts):
    one = scorers.load_pickscore(str(tiny_clip), "cpu", batch_size=1)(images, prompts)
    all_ = scorers.load_pickscore(str(tiny_clip), "cpu", batch_size=64)(images, prompts)
    np.testing.assert_allclose(one, all_, rtol=1e-4, atol=1e-4)


def test_aesthetic_head_from_folder_matches_mlp_on_normalised_embedding(aesthetic_dir, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    values = scorers.load_aesthetic(str(aesthetic_dir), "cpu", batch_size=4)(images, prompts)
    model, proc = CLIPModel.from_pretrained(aesthetic_dir).eval(), CLIPProcessor.from_pretrained(aesthetic_dir)
    state = torch.load(aesthetic_dir / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    with torch.no_grad():
        emb = model.get_image_features(**proc(images=images, return_tensors="pt"))
        emb = emb if torch.is_tensor(emb) else emb.pooler_output
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # dropout layers are identity in eval
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(values, x.squeeze(-1).numpy(), rtol=1e-4, atol=1e-5)


def test_aesthetic_head_file_with_clip_option(aesthetic_dir, tiny_clip, images, prompts):
    head = aesthetic_dir / "sac+logos+ava1-l14-linearMSE.pth"
    from_file = scorers.load_aesthetic(str(head), "cpu", clip=str(tiny_clip))(images, prompts)
    from_folder = scorers.load_aesthetic(str(aesthetic_dir), "cpu")(images, prompts)
    np.testing.assert_allclose(from_file, from_folder, rtol=1e-5)


def test_aesthetic_head_keys_match_published_layout():
    keys = set(scorers.aesthetic_head(768).state_dict())
    expected = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert keys == expected
    assert scorers.aesthetic_head(768).layers[0].in_features == 768


def test_aesthetic_rejects_a_foreign_state_dict(tmp_path, tiny_clip):
    torch.save({"fc.weight": torch.zeros(1, 8)}, tmp_path / "head.pth")
    with pytest.raises(ScorerError, match="layers.0.weight"):
        scorers.load_aesthetic(str(tmp_path / "head.pth"), "cpu", clip=str(tiny_clip))


def test_toy_scorer_wraps_the_judge(images, prompts):
    score = parse_metric("toy:preference").load("cpu")
    np.testing.assert_allclose(score(images, prompts), judges.preference(images, prompts))
    fid = parse_metric("toy:fidelity").load("cpu")
    np.testing.assert_allclose(fid(images, prompts), judges.fidelity(images, prompts))


def test_one_prompt_per_image_is_required(tiny_clip, images, prompts):
    with pytest.raises(ValueError, match="one prompt per image"):
        scorers.load_clip(str(tiny_clip), "cpu")(images, prompts[:2])


def test_missing_local_weights_say_what_to_download(tmp_path):
    with pytest.raises(ScorerError, match="does not exist.*huggingface-cli download"):
        scorers.load_pickscore(str(tmp_path / "nope" / "PickScore_v1"), "cpu")
    with pytest.raises(ScorerError, match="aesthetic head .* does not exist.*sac\\+logos"):
        scorers.load_aesthetic(str(tmp_path / "missing.pth"), "cpu")


def test_unreachable_hub_weights_say_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ScorerError, match="openai/clip-vit-large-patch14.*huggingface-cli download"):
        scorers.load_clip(None, "cpu")


@pytest.mark.parametrize("metric, module, package", [
    ("hpsv2", "open_clip", "open_clip_torch"),
    ("imagereward", "ImageReward", "image-reward"),
])
def test_missing_package_names_the_pip_package(monkeypatch, metric, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ScorerError, match=f"pip install {package}"):
        parse_metric(metric).load("cpu")


def test_imagereward_adapter_groups_by_prompt(monkeypatch, images, prompts):
    calls = []

    class FakeModel:
        def score(self, prompt, imgs):
            calls.append((prompt, len(imgs)))
            values = [float(np.asarray(im).mean()) + len(prompt) for im in imgs]
            return values[0] if len(values) == 1 else values  # the package returns a float for one image

    fake = types.SimpleNamespace(load=lambda name, device, download_root=None, med_config=None: FakeModel())
    monkeypatch.setitem(sys.modules, "ImageReward", fake)
    ps = ["a red circle", "a blue square", "a red circle", "a red circle", "a blue square", "x"]
    values = scorers.load_imagereward(None, "cpu", batch_size=2)(images, ps)
    expected = [float(np.asarray(im).mean()) + len(p) for im, p in zip(images, ps)]
    np.testing.assert_allclose(values, expected)
    assert calls == [("a red circle", 2), ("a red circle", 1), ("a blue square", 2), ("x", 1)]


def _open_clip():
    """open_clip, or a skip saying why (not installed, or its torchvision does not load)."""
    try:
        import open_clip
    except Exception as err:  # noqa: BLE001  (a CUDA torchvision beside CPU torch raises RuntimeError)
        pytest.skip(f"open_clip_torch is not usable here ({type(err).__name__}: {err}); "
                    "pip install open_clip_torch to run the HPS v2 test")
    return open_clip


def test_hpsv2_tiny_open_clip_checkpoint(tmp_path, images, prompts):
    open_clip = _open_clip()
    config = {"embed_dim": 8,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    arch = tmp_path / "dkto-tiny-hps-test.json"
    arch.write_text(json.dumps(config))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    model = open_clip.create_model("dkto-tiny-hps-test").eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3},
               tmp_path / "HPS_tiny.pt")
    values = scorers.load_hpsv2(str(tmp_path / "HPS_tiny.pt"), "cpu", arch=str(arch), batch_size=4)(images, prompts)
    _, _, preprocess = open_clip.create_model_and_transforms("dkto-tiny-hps-test")
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(open_clip.get_tokenizer("dkto-tiny-hps-test")(prompts))
    expected = (torch.nn.functional.normalize(img, dim=-1) * torch.nn.functional.normalize(txt, dim=-1)).sum(-1)
    np.testing.assert_allclose(values, expected.numpy(), rtol=1e-4, atol=1e-5)
    torch.save({"state_dict": {"wrong": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ScorerError, match="does not fit"):
        scorers.load_hpsv2(str(tmp_path / "bad.pt"), "cpu", arch=str(arch))


def test_hpsv2_unknown_checkpoint_is_clear(tmp_path):
    _open_clip()
    with pytest.raises(ScorerError, match="'v2.0', 'v2.1'"):
        scorers.load_hpsv2(str(tmp_path / "nope.pt"), "cpu")


def test_registry_and_metric_parsing():
    assert set(scorers.SCORERS) == {"pickscore", "clip", "aesthetic", "hpsv2", "imagereward"}
    m = parse_metric("clip=/models/clip")
    assert (m.label, m.scorer.name, m.weights) == ("clip", "clip", "/models/clip")
    assert parse_metric("toy:aesthetic").weights == "aesthetic"
    with pytest.raises(ScorerError, match="unknown metric 'pickscor'.*pickscore"):
        parse_metric("pickscor")
    ms = parse_metrics(["toy:preference,hpsv2=v2.0", "hpsv2=v2.1"], ["toy:preference.batch_size=7"])
    assert [x.label for x in ms] == ["toy:preference", "hpsv2=v2.0", "hpsv2=v2.1"]
    assert ms[0].options == {"batch_size": "7"}
    with pytest.raises(ScorerError, match="METRIC.KEY=VALUE"):
        parse_metrics(["clip"], ["aesthetic.clip=x"])
