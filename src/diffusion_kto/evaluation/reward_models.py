"""The paper's reward models as score functions: PickScore, CLIP score, the LAION aesthetic predictor, HPS v2 and
ImageReward (Diffusion-KTO §5), with the helpers they share.

Every ``load_*(path_or_id, device, **options)`` returns ``score(images, prompts) -> np.ndarray`` (one float per
image, higher is better), batched, on CPU or GPU; :mod:`diffusion_kto.evaluation.scorers` registers them by name
and documents their defaults and options. A missing package or missing weights raises :class:`ScorerError`
saying what to install or download.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import UserError

ScoreFn = Callable[[Sequence, Sequence[str]], np.ndarray]

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
AESTHETIC_HEAD_FILE = "aesthetic-model.pth"
AESTHETIC_HEAD_NAMES = ("sac+logos+ava1-l14-linearMSE.pth", AESTHETIC_HEAD_FILE)
AESTHETIC_HEAD_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                      "sac+logos+ava1-l14-linearMSE.pth")
HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"
IMAGEREWARD_MODEL = "ImageReward-v1.0"
DEFAULT_BATCH = 32


class ScorerError(UserError, RuntimeError):
    """A scorer that cannot be loaded: says which package to install or which weights to download."""


# ---------------------------------------------------------------- shared helpers

def resolve_device(device: str | None) -> str:
    """device, or 'cuda' when a GPU is visible, else 'cpu'."""
    if device:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name) -> object:
    """A torch dtype from 'float32', 'float16', 'bfloat16' (or a dtype)."""
    import torch

    if not isinstance(name, str):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ScorerError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


def require(module: str, package: str, scorer: str):
    """Import an optional module or raise ScorerError naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ScorerError(f"the {scorer!r} scorer needs the {package!r} package, which is not installed "
                          f"({err}): pip install {package}") from None


def _download_help(scorer: str, what: str, err: BaseException, hint: str) -> ScorerError:
    """The error for weights that are neither on disk nor downloadable."""
    detail = " ".join(str(err).split()).rstrip(".")
    return ScorerError(f"could not load the {scorer!r} weights {what!r}: {type(err).__name__}: {detail}. {hint}")


def batches(n: int, size: int):
    """Slices covering range(n) in chunks of size."""
    size = max(int(size), 1)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _rgb(images) -> list:
    """Images as RGB PIL images."""
    from PIL import Image

    out = []
    for im in images:
        if isinstance(im, np.ndarray):
            im = Image.fromarray(im)
        out.append(im.convert("RGB"))
    return out


def check_pairs(images, prompts) -> None:
    """ValueError unless there is one prompt per image."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; a scorer needs one prompt per image")


def _features(output):
    """Projected features from get_*_features: a tensor (transformers 4) or an output's pooler_output (5)."""
    return output if hasattr(output, "ndim") else output.pooler_output


def _has_processor(folder: Path) -> bool:
    """Whether a local folder holds a saved processor (image processor and tokenizer) next to the model."""
    has_images = any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json"))
    has_text = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    return has_images and has_text


def _flag(value) -> bool:
    """A boolean scorer option, given as a bool or as the text of ``--metric-option NAME.KEY=VALUE``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ScorerError(f"expected true or false, got {value!r}")
    return text in ("true", "1", "yes")


class CLIPBackbone:
    """A transformers CLIPModel + processor: normalised image and text embeddings, batched, no gradients."""

    def __init__(self, model_id: str, processor_id: str | None, device: str, dtype, scorer: str, hint: str,
                 allow_pickle=False):
        transformers = require("transformers", "transformers", scorer)
        local = Path(model_id).expanduser()
        if local.is_dir():
            model_id = str(local)
        elif model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:  # a path, not an owner/name id
            raise ScorerError(f"the {scorer!r} model folder {model_id!r} does not exist. {hint}")
        if processor_id is None:
            processor_id = model_id if local.is_dir() and _has_processor(local) else None
        # a local folder loads its safetensors only, unless the user trusts its pickled .bin files (allow_pickle)
        safe = {"use_safetensors": True} if local.is_dir() and not _flag(allow_pickle) else {}
        try:
            model = transformers.CLIPModel.from_pretrained(model_id, **safe)
        except Exception as err:
            raise _download_help(scorer, model_id, err, hint) from err
        self.model = model.eval().to(device=device, dtype=_dtype(dtype))
        proc = processor_id or model_id
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(proc)
        except Exception as err:
            raise _download_help(scorer, f"{proc} (processor)", err, hint) from err
        self.device, self.dtype = device, self.model.dtype
        positions = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        self.max_length = min(int(getattr(self.processor.tokenizer, "model_max_length", positions)), positions)

    def images(self, images) -> object:
        """L2-normalised image embeddings: (N, D)."""
        import torch

        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            feats = _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def texts(self, prompts: Sequence[str]) -> object:
        """L2-normalised text embeddings: (N, D); prompts longer than the context are truncated."""
        import torch

        tok = self.processor.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
        with torch.no_grad():
            feats = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                           attention_mask=tok["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def _similarity_scorer(backbone: CLIPBackbone, scale: Callable, batch_size: int) -> ScoreFn:
    """score(images, prompts) = scale(cosine similarity of matched pairs), batched."""

    def score(images, prompts) -> np.ndarray:
        check_pairs(images, prompts)
        images, prompts, out = list(images), list(prompts), []
        for part in batches(len(images), batch_size):
            cos = (backbone.images(images[part]) * backbone.texts(prompts[part])).sum(-1)
            out.append(scale(cos).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    return score


# ---------------------------------------------------------------- pickscore and clip

def load_pickscore(path_or_id: str | None = None, device: str = "cpu", *, processor: str | None = None,
                   dtype="float32", batch_size: int = DEFAULT_BATCH, allow_pickle=False) -> ScoreFn:
    """PickScore: logit_scale.exp() · cos(text, image) with the PickScore_v1 CLIP-H and the LAION processor."""
    model_id = path_or_id or PICKSCORE_MODEL
    if processor is None and not (Path(model_id).is_dir() and _has_processor(Path(model_id))):
        processor = PICKSCORE_PROCESSOR
    hint = (f"Download it (huggingface-cli download {PICKSCORE_MODEL}; and {PICKSCORE_PROCESSOR} for the "
            "processor) or pass a local folder: --metrics pickscore=/path/to/PickScore_v1")
    backbone = CLIPBackbone(model_id, processor, device, dtype, "pickscore", hint, allow_pickle)
    logit_scale = float(backbone.model.logit_scale.detach().exp())
    return _similarity_scorer(backbone, lambda cos: logit_scale * cos, int(batch_size))


def load_clip(path_or_id: str | None = None, device: str = "cpu", *, processor: str | None = None,
              dtype="float32", batch_size: int = DEFAULT_BATCH, allow_pickle=False) -> ScoreFn:
    """CLIP score: 100 · max(cos(text, image), 0) (the torchmetrics convention), default CLIP ViT-L/14."""
    model_id = path_or_id or CLIP_MODEL
    hint = (f"Download it (huggingface-cli download {CLIP_MODEL}) or pass a local CLIP folder: "
            "--metrics clip=/path/to/clip")
    backbone = CLIPBackbone(model_id, processor, device, dtype, "clip", hint, allow_pickle)
    return _similarity_scorer(backbone, lambda cos: 100.0 * cos.clamp(min=0), int(batch_size))


# ---------------------------------------------------------------- aesthetic

def aesthetic_head(input_dim: int = 768):
    """The LAION improved-aesthetic-predictor MLP, in the published layer layout.

    ``layers`` = Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1): no activations, so state-dict keys are layers.{0,2,4,6,7}.{weight,bias}.
    """
    from torch import nn

    class AestheticHead(nn.Module):
        """MLP regressor from a normalised CLIP image embedding to a 1-10 aesthetic rating."""

        def __init__(self, dim: int):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

        def forward(self, x):
            """Ratings for (N, dim) embeddings: (N, 1)."""
            return self.layers(x)

    return AestheticHead(int(input_dim))


def _find_head(folder: Path) -> Path | None:
    """The aesthetic head file in a folder: a known name, else the only .pth/.pt file."""
    for name in AESTHETIC_HEAD_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(folder.glob("*.pth")) + sorted(folder.glob("*.pt"))
    return candidates[0] if len(candidates) == 1 else None


def _head_path(path_or_id: str | None) -> tuple[Path, str | None]:
    """(head file, CLIP folder found beside it or None) for the aesthetic scorer's argument."""
    hint = (f"Download the head ({AESTHETIC_HEAD_URL}, or huggingface-cli download {AESTHETIC_HEAD_REPO} "
            f"{AESTHETIC_HEAD_FILE}) and pass it: --metrics aesthetic=/path/to/sac+logos+ava1-l14-linearMSE.pth")
    if path_or_id is None:
        hub = require("huggingface_hub", "huggingface_hub", "aesthetic")
        try:
            return Path(hub.hf_hub_download(AESTHETIC_HEAD_REPO, AESTHETIC_HEAD_FILE)), None
        except Exception as err:
            raise _download_help("aesthetic", f"{AESTHETIC_HEAD_REPO}/{AESTHETIC_HEAD_FILE}", err, hint) from err
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return path, None
    if path.is_dir():
        head = _find_head(path)
        if head is None:
            raise ScorerError(f"no aesthetic head in {path} (expected one of {list(AESTHETIC_HEAD_NAMES)} or a "
                              f"single .pth file). {hint}")
        return head, str(path) if (path / "config.json").is_file() else None
    raise ScorerError(f"the aesthetic head {str(path)!r} does not exist. {hint}")


def load_aesthetic_head(path: Path, device: str = "cpu"):
    """The MLP head from a state dict file, loaded with torch.load(weights_only=True)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ScorerError(f"could not read the aesthetic head {str(path)!r}: {type(err).__name__}: {err}") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise ScorerError(f"{path}: not an improved-aesthetic-predictor state dict (expected keys "
                          f"layers.0.weight ... layers.7.bias, got {keys})")
    head = aesthetic_head(state["layers.0.weight"].shape[1])
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise ScorerError(f"{path}: the state dict does not fit the aesthetic MLP layout: {err}") from err
    return head.eval().to(device)


def load_aesthetic(path_or_id: str | None = None, device: str = "cpu", *, clip: str | None = None,
                   dtype="float32", batch_size: int = DEFAULT_BATCH, allow_pickle=False) -> ScoreFn:
    """LAION aesthetic score: MLP head on the L2-normalised CLIP ViT-L/14 image embedding (prompts unused)."""
    import torch

    head_file, beside = _head_path(path_or_id)
    clip_id = clip or beside or CLIP_MODEL
    hint = (f"Download the CLIP backbone (huggingface-cli download {CLIP_MODEL}) or pass a local one: "
            "--metric-option aesthetic.clip=/path/to/clip-vit-large-patch14")
    backbone = CLIPBackbone(clip_id, None, device, dtype, "aesthetic", hint, allow_pickle)
    head = load_aesthetic_head(head_file, device)
    width = head.layers[0].in_features
    size = int(batch_size)

    def score(images, prompts=None) -> np.ndarray:
        out = []
        for part in batches(len(images), size):
            emb = backbone.images(images[part])
            if emb.shape[-1] != width:
                raise ScorerError(f"the aesthetic head expects {width}-d CLIP embeddings but {clip_id} gives "
                                  f"{emb.shape[-1]}-d ones (the published head needs CLIP ViT-L/14)")
            with torch.no_grad():
                out.append(head(emb.to(device)).squeeze(-1).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    return score


# ---------------------------------------------------------------- hpsv2

def _hps_checkpoint(path_or_id: str | None) -> Path:
    """A local HPS checkpoint file, or the v2.0 / v2.1 file downloaded from xswu/HPSv2."""
    version = path_or_id or "v2.1"
    if version in HPS_FILES:
        hub = require("huggingface_hub", "huggingface_hub", "hpsv2")
        try:
            return Path(hub.hf_hub_download(HPS_REPO, HPS_FILES[version]))
        except Exception as err:
            raise _download_help("hpsv2", f"{HPS_REPO}/{HPS_FILES[version]}", err,
                                 f"Download it (huggingface-cli download {HPS_REPO} {HPS_FILES[version]}) and "
                                 f"pass the file: --metrics hpsv2=/path/to/{HPS_FILES[version]}") from err
    path = Path(version).expanduser()
    if not path.is_file():
        raise ScorerError(f"the HPS checkpoint {version!r} does not exist; pass 'v2.0', 'v2.1' or a local "
                          f"{HPS_FILES['v2.1']} file (from the Hub repo {HPS_REPO})")
    return path


def _open_clip_arch(open_clip, arch: str) -> str:
    """An OpenCLIP model name; a .json path is registered as a custom model config named after its stem."""
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ScorerError(f"OpenCLIP model config {arch!r} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    return arch


def load_hpsv2(path_or_id: str | None = None, device: str = "cpu", *, arch: str = HPS_ARCH,
               dtype="float32", batch_size: int = DEFAULT_BATCH) -> ScoreFn:
    """HPS v2 / v2.1: cos(text, image) of an OpenCLIP ViT-H-14 loaded from the HPS checkpoint's state_dict."""
    import torch

    open_clip = require("open_clip", "open_clip_torch", "hpsv2")
    checkpoint = _hps_checkpoint(path_or_id)
    name = _open_clip_arch(open_clip, arch)
    # image_resize_mode='longest' + zero padding is the HPS v2 evaluation transform (it equals a plain resize
    # for the square images diffusion models produce)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None,
                                                                     image_resize_mode="longest")
    except TypeError:  # open_clip < 2.24 has no image_resize_mode; resize + centre crop is the same for squares
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ScorerError(f"could not read the HPS checkpoint {str(checkpoint)!r}: {type(err).__name__}: {err}") from err
    state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ScorerError(f"{checkpoint}: the checkpoint does not fit the OpenCLIP {name!r} model: {err}") from err
    model = model.eval().to(device=device, dtype=_dtype(dtype))
    tokenizer = open_clip.get_tokenizer(name)
    size, model_dtype = int(batch_size), _dtype(dtype)

    def score(images, prompts) -> np.ndarray:
        check_pairs(images, prompts)
        out = []
        for part in batches(len(images), size):
            pixels = torch.stack([preprocess(im) for im in _rgb(images[part])]).to(device, model_dtype)
            tokens = tokenizer(list(prompts[part])).to(device)
            with torch.no_grad():
                img = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
                txt = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
            out.append((img * txt).sum(-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    return score


# ---------------------------------------------------------------- imagereward

def imagereward_med_config(path_or_id: str | None, med_config: str | None) -> str | None:
    """The BLIP config a local ImageReward checkpoint is loaded with: ``med_config`` as given, else the
    ``med_config.json`` beside the checkpoint; None for the hub model (the package fetches both). Without it the
    package would reach the hub for the config even for a local checkpoint."""
    if med_config is not None:
        if not Path(med_config).expanduser().is_file():
            raise ScorerError(f"imagereward: med_config {med_config!r} is not a file")
        return str(Path(med_config).expanduser())
    if path_or_id is None or not Path(path_or_id).expanduser().exists():
        return None
    beside = Path(path_or_id).expanduser().resolve().parent / "med_config.json"
    if not beside.is_file():
        raise ScorerError(f"imagereward: the local checkpoint {path_or_id!r} needs its med_config.json (the BLIP "
                          f"config of THUDM/ImageReward) beside it, at {beside}, or given with --metric-option "
                          "imagereward.med_config=PATH; without it the image-reward package would fetch it from the hub")
    return str(beside)


def load_imagereward(path_or_id: str | None = None, device: str = "cpu", *, download_root: str | None = None,
                     batch_size: int = DEFAULT_BATCH, med_config: str | None = None) -> ScoreFn:
    """ImageReward through the `image-reward` package: RM.load(name or .pt path), scored per prompt group; a local
    checkpoint is loaded with a local med_config (:func:`imagereward_med_config`), never reaching the hub."""
    config = imagereward_med_config(path_or_id, med_config)
    rm = require("ImageReward", "image-reward", "imagereward")
    name = path_or_id or IMAGEREWARD_MODEL
    try:
        model = rm.load(name, device=device, download_root=download_root, med_config=config)
    except Exception as err:
        raise _download_help("imagereward", name, err,
                             f"Let the image-reward package download {IMAGEREWARD_MODEL} once (it fetches "
                             "ImageReward.pt and med_config.json from the THUDM/ImageReward Hub repo), or pass "
                             "the downloaded file: --metrics imagereward=/path/to/ImageReward.pt") from err
    size = int(batch_size)

    def score(images, prompts) -> np.ndarray:
        check_pairs(images, prompts)
        images, out = _rgb(images), np.zeros(len(images))
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        for prompt, idx in groups.items():
            for part in batches(len(idx), size):
                chunk = idx[part]
                rewards = model.score(prompt, [images[i] for i in chunk])
                out[chunk] = np.atleast_1d(np.asarray(rewards, dtype=np.float64)).ravel()
        return out

    return score
