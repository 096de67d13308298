"""The latent and text-embedding cache that `dkto cache` writes and the trainer reads (``data.cache: DIR``).

Layout of a cache folder::

    manifest.json              format, key (resolution, crop, flips, model id + fingerprints), image and prompt index
    latents-00000.safetensors  "mean", "std": (N, V, C, h, w) float32, V = 1 (unflipped) or 2 (unflipped, flipped);
                               "original_size": (N, 2) and "crop": (N, V, 4) int64, the geometry of each image and
                               variant (:func:`~.transforms.crop_geometry`, SDXL's size and crop conditioning)
    text-00000.safetensors     the family's text conditioning, one tensor per field (SD: "hidden_states": (M, L, D)),
                               float32, one row per distinct prompt ("" included)

Images are keyed by the sha256 of their encoded bytes, so a changed image has no entry and is refused, and the
same image in several rows is encoded once. The VAE posterior is stored as its mean and std, not as a sample: the
trainer still draws x0 = mean + std * eps with the counter-based eps of each (seed, draw id), so a cached run
computes exactly the losses of an uncached one. Crops are centred (a random crop per draw cannot be cached);
with ``random_flip`` both the image and its mirror image are stored and each draw picks its own. The manifest is
written last: a folder without one is an unfinished cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .feedback import load_image
from .rows import FeedbackError, FeedbackRow
from .transforms import DrawChoices, crop_geometry, transform_image

FORMAT = 3  # 3: latent shards hold each image's geometry; 2: text shards hold the conditioning's fields by name
MANIFEST = "manifest.json"


class CacheError(FeedbackError):
    """A cache folder is missing, unfinished, or was built for other data, resolution or model; names the file."""


@dataclass(frozen=True)
class CacheKey:
    """What the cached tensors depend on; a cache is used only when every field matches the run's."""

    resolution: int
    center_crop: bool  # always true for a cache (random crops are per draw)
    flips: tuple[bool, ...]  # (False,) or (False, True): the stored variants of every image
    model: str  # model.pretrained as given (informational; the fingerprints decide)
    vae: str  # sha256 of the VAE folder (component_fingerprint)
    text_encoder: str | None  # sha256 of the text encoder + tokenizer folders; None: no text embeddings cached


def image_hash(row: FeedbackRow) -> str:
    """sha256 of the row's encoded image bytes (the file's content, or the bytes held by the row)."""
    if isinstance(row.image, (bytes, bytearray)):
        return hashlib.sha256(row.image).hexdigest()
    try:
        return hashlib.sha256(Path(row.image).read_bytes()).hexdigest()
    except OSError as err:
        raise FeedbackError(f"{row.where}: image {str(row.image)!r} cannot be read ({err.strerror})") from None


def row_prompts(rows: Sequence[FeedbackRow], *, caption_dropout: float) -> list[str]:
    """The prompts of the rows, and "" under caption dropout (before an objective rewrites them), in row order."""
    return [r.prompt for r in rows] + ([""] if caption_dropout > 0 else [])


def write_cache(
    out: str | Path,
    rows: Sequence[FeedbackRow],
    key: CacheKey,
    *,
    moments: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    text: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
    prompts: Sequence[str] = (),
    shard_size: int = 1024,
    batch_size: int = 16,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Encode every distinct image (each flip variant) and prompt, write shards, then the manifest; returns it.

    moments(pixels (n, 3, R, R)) -> VAE posterior (mean, std), each (n, C, h, w); text(prompts) -> the family's
    conditioning tensors by field name, each (n, ...)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if shard_size < 1 or batch_size < 1:
        raise ValueError("shard_size and batch_size must be >= 1")
    unique = {image_hash(r): r for r in rows}  # first row of each distinct image
    images: dict[str, list] = {}
    shards: list[str] = []
    for s, chunk in enumerate(_chunks(list(unique.items()), shard_size)):
        means, stds, sizes, crops = [], [], [], []
        for batch in _chunks(chunk, batch_size):
            variants = [_pixels(row, key, flip) for _, row in batch for flip in key.flips]
            mean, std = moments(torch.stack([pixels for pixels, _ in variants]))  # (n V, C, h, w)
            means.append(mean.float().cpu().unflatten(0, (len(batch), len(key.flips))))
            stds.append(std.float().cpu().unflatten(0, (len(batch), len(key.flips))))
            sizes += [geometry["original_size"] for _, geometry in variants[::len(key.flips)]]
            crops += [geometry["crop"] for _, geometry in variants]
        name = f"latents-{s:05d}.safetensors"
        save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
                   "original_size": torch.tensor(sizes, dtype=torch.long),
                   "crop": torch.tensor(crops, dtype=torch.long).unflatten(0, (len(chunk), len(key.flips)))},
                  str(out / name))
        shards.append(name)
        images.update({h: [s, i] for i, (h, _) in enumerate(chunk)})
        if progress:
            progress(f"latents: {len(images)}/{len(unique)} images")
    index, text_shards = _write_text(out, list(dict.fromkeys(prompts)), text, shard_size, batch_size, save_file)
    manifest = {"format": FORMAT, "key": asdict(key), "rows": len(rows), "images": images, "latent_shards": shards,
                "prompts": index, "text_shards": text_shards}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, out / MANIFEST)
    return out / MANIFEST


def _write_text(out: Path, prompts: list[str], text, shard_size: int, batch_size: int, save_file):
    """Encode and write the prompt embeddings in shards; returns ({prompt: [shard, index]}, shard names)."""
    if text is None:
        return {}, []
    index, shards = {}, []
    for s, chunk in enumerate(_chunks(prompts, shard_size)):
        parts = [text(list(batch)) for batch in _chunks(chunk, batch_size)]  # [{field: (n, ...)}]
        fields = {k: torch.cat([p[k].float().cpu() for p in parts]).contiguous() for k in parts[0]}
        name = f"text-{s:05d}.safetensors"
        save_file(fields, str(out / name))
        shards.append(name)
        index.update({p: [s, i] for i, p in enumerate(chunk)})
    return index, shards


def _pixels(row: FeedbackRow, key: CacheKey, flip: bool) -> tuple[torch.Tensor, dict]:
    """The centre-cropped (3, R, R) image of a row, mirrored when ``flip`` (the trainer's own transform), and the
    geometry of that crop."""
    choices = DrawChoices(crop_x=0.5, crop_y=0.5, flip=flip, drop_caption=False)
    image = load_image(row)
    return (transform_image(image, key.resolution, choices, center_crop=True, random_flip=True),
            crop_geometry(image.size, key.resolution, choices, center_crop=True, random_flip=True))


def _chunks(items: list, size: int) -> Iterable[list]:
    """Consecutive slices of at most ``size`` items."""
    return (items[i:i + size] for i in range(0, len(items), size))


class LatentCache:
    """A finished cache folder opened for reading; shards are read slice by slice, never whole."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest_path = self.folder / MANIFEST
        if not self.manifest_path.is_file():
            raise CacheError(f"{self.manifest_path}: no cache manifest (data.cache names a folder that "
                             "`dkto cache` did not finish writing); run `dkto cache` for it first")
        try:
            m = json.loads(self.manifest_path.read_text())
        except ValueError as err:
            raise CacheError(f"{self.manifest_path}: not valid JSON ({err})") from None
        if m.get("format") != FORMAT:
            raise CacheError(f"{self.manifest_path}: key 'format' is {m.get('format')!r}, this version reads "
                             f"{FORMAT}; rebuild the cache with `dkto cache`")
        self.key = CacheKey(**{**m["key"], "flips": tuple(m["key"]["flips"])})
        self.images: dict[str, list[int]] = m["images"]
        self.prompts: dict[str, list[int]] = m["prompts"]
        self.latent_shards: list[str] = m["latent_shards"]
        self.text_shards: list[str] = m["text_shards"]
        self._handles: dict[str, object] = {}
        self._row_hashes: dict[FeedbackRow, str] = {}
        self._pid = os.getpid()

    @property
    def has_text(self) -> bool:
        """Whether text embeddings were cached."""
        return self.key.text_encoder is not None

    def check(self, expected: CacheKey) -> None:
        """Refuse a cache built for another resolution, crop, model or text encoder (naming the manifest key)."""
        got = self.key
        for field in ("resolution", "center_crop", "vae"):
            if getattr(got, field) != getattr(expected, field):
                raise CacheError(f"{self.manifest_path}: key '{field}' is {getattr(got, field)!r} but this run needs "
                                 f"{getattr(expected, field)!r} (model {expected.model!r}, cache built for "
                                 f"{got.model!r}); the cache is stale: rebuild it with `dkto cache`")
        if set(expected.flips) - set(got.flips):
            raise CacheError(f"{self.manifest_path}: key 'flips' is {list(got.flips)} but data.random_flip=true needs "
                             "the mirrored images too; rebuild with random_flip on, or set data.random_flip=false")
        if expected.text_encoder is not None and self.has_text and got.text_encoder != expected.text_encoder:
            raise CacheError(f"{self.manifest_path}: key 'text_encoder' is {got.text_encoder!r} but the run's text "
                             f"encoder is {expected.text_encoder!r}; the cache is stale: rebuild it with `dkto cache`")

    def image_keys(self, rows: Sequence[FeedbackRow]) -> list[str]:
        """The content hash of every row, refusing rows whose image has no entry (changed or new images)."""
        keys = []
        for row in rows:
            h = self._row_hashes.get(row) or image_hash(row)  # each image file is read once per cache object
            if h not in self.images:
                raise CacheError(f"{row.where}: image {_describe(row)} (sha256 {h[:16]}...) is not in "
                                 f"{self.manifest_path}: the image changed or the row is new since `dkto cache` ran; "
                                 "rebuild the cache")
            self._row_hashes[row] = h
            keys.append(h)
        return keys

    def missing_prompts(self, prompts: Iterable[str]) -> list[str]:
        """Prompts a run needs that have no cached embedding."""
        return [p for p in prompts if p not in self.prompts]

    def latents(self, key: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE posterior of one image, each (C, h, w) float32; ``flip`` picks the mirror image."""
        shard, i = self.images[key]
        variant = self.key.flips.index(bool(flip))
        handle = self._open(self.latent_shards[shard])
        return handle.get_slice("mean")[i:i + 1][0, variant], handle.get_slice("std")[i:i + 1][0, variant]

    def item(self, key: str, flip: bool) -> dict:
        """A training item's image part from the cache: "latent_mean", "latent_std" (C, h, w) and the geometry of the
        crop, "original_size" (h, w) and "crop" (top, left, h, w), of one image and flip variant."""
        mean, std = self.latents(key, flip)
        shard, i = self.images[key]
        handle = self._open(self.latent_shards[shard])
        crop = handle.get_slice("crop")[i:i + 1][0, self.key.flips.index(bool(flip))]
        size = handle.get_slice("original_size")[i:i + 1][0]
        return {"latent_mean": mean, "latent_std": std, "original_size": tuple(size.tolist()),
                "crop": tuple(crop.tolist())}

    def text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Cached text conditioning of ``prompts``, field by field: each (B, ...) float32."""
        missing = self.missing_prompts(prompts)
        if missing:
            raise CacheError(f"{self.manifest_path}: key 'prompts' has no embedding for {missing[0]!r}")
        rows: dict[str, list[torch.Tensor]] = {}
        for p in prompts:
            shard, i = self.prompts[p]
            handle = self._open(self.text_shards[shard])
            for name in handle.keys():
                rows.setdefault(name, []).append(handle.get_slice(name)[i:i + 1][0])
        return {name: torch.stack(values) for name, values in rows.items()}

    def _open(self, name: str):
        """A safetensors handle for a shard, opened once per process (DataLoader workers open their own)."""
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            path = self.folder / name
            if not path.is_file():
                raise CacheError(f"{path}: shard listed in {self.manifest_path} is missing; rebuild the cache")
            self._handles[name] = safe_open(str(path), framework="pt")
        return self._handles[name]

    def __getstate__(self) -> dict:
        """Pickle without open handles (DataLoader workers reopen the shards)."""
        return {**self.__dict__, "_handles": {}}


def _describe(row: FeedbackRow) -> str:
    """The image of a row as a short string: its path, or the size of its bytes."""
    return repr(str(row.image)) if isinstance(row.image, Path) else f"<{len(row.image)} bytes>"
