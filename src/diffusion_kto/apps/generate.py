"""``dkto generate``: images of a model for people (or a judge) to label, written into a labeling-queue folder.

The folder: ``images/<id>.png``, ``queue.jsonl`` (one row per image: id, image, prompt, model, adapter, seed) and
``generate.json`` (the settings). Image i is prompt ``i // per_prompt`` with seed ``seed + i``, so a killed run
resumes where it stopped: the queue's rows say which images are done (it redraws from the last whole batch, so
that every image is drawn in the same batch as in an uninterrupted run), and a run with other settings is refused.
Each batch's images are written (atomically) before their rows, and the rows are flushed to disk."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..evaluation.prompts import load_prompts
from ..sampling import generate, load_pipeline
from ..toy import world
from .demo import SAMPLING
from .label.store import QUEUE_FILE, read_queue

SETTINGS_FILE = "generate.json"


@dataclass
class GenerateSettings:
    """What ``dkto generate`` draws: the model (plus a LoRA or UNet), the prompts, how many images each, and how."""

    model: str = "toy"
    lora: str | None = None  # a run folder holding pytorch_lora_weights.safetensors
    unet: str | None = None  # a run folder holding a full fine-tune's unet/
    prompts: str = "toy"  # "toy" (the shapes world's training prompts) or a .txt / .jsonl / .csv file
    per_prompt: int = 4
    seed: int = 0
    steps: int | None = None  # None: the toy demo's 20 on toy, 25 otherwise
    guidance: float | None = None  # None: 3.0 on toy, 7.5 otherwise
    resolution: int | None = None  # None: the model's (32 on toy)
    batch_size: int = 16

    def sampling(self) -> dict:
        """Sampler keywords for :func:`~diffusion_kto.sampling.generate`, the toy demo's where not given."""
        toy = self.model == "toy"
        return {"steps": self.steps or (SAMPLING["steps"] if toy else 25),
                "guidance": self.guidance if self.guidance is not None else (SAMPLING["guidance"] if toy else 7.5),
                "resolution": self.resolution or (SAMPLING["resolution"] if toy else None)}


def prompt_list(spec: str) -> list[str]:
    """The prompts to draw: ``toy`` = the shapes world's training prompts (the held-out ones stay for evaluation)."""
    return world.train_prompts() if spec == "toy" else list(load_prompts(spec).prompts)


def _settings_record(settings: GenerateSettings) -> dict:
    """The settings as ``generate.json`` records them (the prompt list itself, so a changed file is noticed)."""
    return {**asdict(settings), "sampling": settings.sampling(), "prompt_list": prompt_list(settings.prompts)}


def _start(out: Path, settings: GenerateSettings) -> list[dict]:
    """Open or create the queue folder; the rows already done (a resumed run's), refusing other settings."""
    record = _settings_record(settings)
    path = out / SETTINGS_FILE
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier != record:
            changed = sorted(k for k in record if earlier.get(k) != record[k])
            raise FileExistsError(f"{out} holds a queue generated with other settings ({', '.join(changed)} differ); "
                                  "choose another --out, or repeat the first command to resume it")
        return read_queue(out) if (out / QUEUE_FILE).is_file() else []
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a dkto generate queue; choose another --out")
    (out / "images").mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return []


def _write_batch(out: Path, rows: list[dict], images: list, done: int) -> None:
    """Save a batch's images atomically, then append their rows to the queue (rewriting a torn last line)."""
    for row, image in zip(rows, images):
        tmp = out / "images" / f".{row['id']}.tmp.png"
        image.save(tmp)
        os.replace(tmp, out / row["image"])
    queue = out / QUEUE_FILE
    kept = queue.read_text(encoding="utf-8").splitlines()[:done] if queue.is_file() else []
    text = "".join(line + "\n" for line in kept) + "".join(json.dumps(r) + "\n" for r in rows)
    tmp = queue.with_name(queue.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, queue)


def generate_queue(out: str | Path, settings: GenerateSettings, *, pipe=None, progress: bool = True) -> Path:
    """Draw every image of the settings not yet in the queue at ``out``; the folder. ``pipe``: an already loaded
    pipeline of the same model (the loop passes its own)."""
    out = Path(out)
    done = len(_start(out, settings))
    done -= done % settings.batch_size  # resume on a batch boundary: a batch of other images changes the numerics
    prompts = prompt_list(settings.prompts)
    total = len(prompts) * settings.per_prompt
    if done >= total:
        return out
    if pipe is None:
        pipe = load_pipeline(settings.model, lora=settings.lora, unet=settings.unet)
    adapter = settings.lora or settings.unet
    bar = tqdm(total=total, initial=done, desc="generate", disable=not progress)
    for start in range(done, total, settings.batch_size):
        index = range(start, min(start + settings.batch_size, total))
        rows = [{"id": f"{i:06d}", "image": f"images/{i:06d}.png", "prompt": prompts[i // settings.per_prompt],
                 "model": settings.model, "adapter": adapter, "seed": settings.seed + i} for i in index]
        images = generate(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows],
                          batch_size=settings.batch_size, **settings.sampling())
        _write_batch(out, rows, images, start)
        bar.update(len(rows))
    bar.close()
    return out
