"""Videos during training: a few fixed prompts (T2V) or reference images + prompts (I2V) sampled with the current
weights (adapters on) every `run.sample_every` steps, through megatron_wan.sampling's loop (UniPC with the objective's
shift, `run.sample_steps` steps, CFG `run.sample_guidance_scale`; under CP every rank steps only its own frames).

The prompts are the first `run.sample_count` distinct ones of the validation pairs, with their stored text (and I2V
conditioning), or of `run.sample_prompts`: a .txt file (one prompt a line) or a .jsonl of {"prompt", "image"} (I2V;
image paths relative to the file), sized like the training latents. Text the pairs do not hold (a prompt file, the
negative prompt of CFG) is encoded once, at start, by rank 0 with the umT5 of the folder that encoded the data (the
dataset manifest's `model`), and handed to the other ranks through OUT/samples/conditions.pt. Each sample has its
own fixed seed, so the videos of successive steps differ only by what training changed.

Rank 0 decodes with that folder's VAE (visiting the device only while it runs) and writes OUT/samples/step_N/K.mp4,
prompts.json and contact_sheet.png (frames over time, one row a prompt).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_wan.config import ConfigError
from megatron_wan.files import atomic_path
from megatron_wan.models import spec_for_folder
from megatron_wan.models import task as task_of
from megatron_wan.models.wan21.conditioner import pad_text
from megatron_wan.objectives.pair_step import Conditions
from megatron_wan.sampling import SamplingConfig, denoise, initial_noise, save_video

SHEET_FRAMES = 8  # frames per row of a contact sheet


def contact_sheet(videos: list[np.ndarray], frames: int = SHEET_FRAMES) -> np.ndarray:
    """RGB uint8 videos [F, H, W, 3] -> one image [rows * H, frames * W, 3]: `frames` frames evenly spaced in time
    per row, one row a video (narrower rows padded with black)."""
    rows = []
    for video in videos:
        picks = np.linspace(0, len(video) - 1, min(frames, len(video))).round().astype(int)
        rows.append(np.concatenate(list(video[picks]), axis=1))
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)


def read_prompt_file(path, task: str) -> list[dict]:
    """[{"prompt"[, "image"]}] of a .txt (one prompt a line, T2V) or a .jsonl prompt file."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    image = task_of(task).image  # the task conditions on a reference image
    if path.suffix != ".jsonl":
        if image:
            raise ConfigError(f"run.sample_prompts: {path}: I2V needs a .jsonl of {{\"prompt\", \"image\"}}")
        return [{"prompt": line.strip()} for line in lines]
    records = []
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        if not record.get("prompt") or (image and not record.get("image")):
            fields = '"prompt", "image"' if image else '"prompt"'
            raise ConfigError(f"run.sample_prompts: {path}:{n}: expected a record with {fields}")
        if record.get("image"):
            record["image"] = str(path.parent / record["image"])
        records.append(record)
    return records


def _from_pairs(dataset, count: int) -> list[dict]:
    """The first `count` distinct (prompt, image) of `dataset`'s pairs with their stored conditioning."""
    items, seen = [], set()
    for i, pair in enumerate(dataset.pairs):
        key = (pair.get("prompt"), pair.get("image"))
        if key in seen:
            continue
        seen.add(key)
        item = dataset[i]
        items.append({"prompt": pair.get("prompt") or pair["id"], "text": item["text_emb"],
                      "clip": item.get("clip_emb"), "cond": item.get("cond_latent"),
                      "shape": list(item["winner_latent"].shape)})
        if len(items) == count:
            break
    return items


def _encode_prompts(encoders, records, shape, text_len) -> list[dict]:
    from PIL import Image

    geometry = encoders.geometry if encoders.vae is not None else None
    items = []
    for record in records:
        item = {"prompt": record["prompt"], "text": pad_text(encoders.text([record["prompt"]])[0], text_len),
                "clip": None, "cond": None, "shape": list(shape)}
        if record.get("image"):
            size = (shape[3] * geometry.spatial_stride, shape[2] * geometry.spatial_stride)
            image = Image.open(record["image"]).convert("RGB").resize(size)
            frames = geometry.frames(shape[1])
            item["clip"], item["cond"] = encoders.image_conditioning(image, frames)
        items.append(item)
    return items


def prepare_conditions(cfg, val_dataset, train_shape, encoder_dir, path) -> None:
    """Rank 0's part: the sample prompts' conditioning and the negative prompt's text, written to `path`."""
    from megatron_wan.sampling import WAN_NEGATIVE_PROMPT

    run, task = cfg.run, cfg.run.task
    guided = SamplingConfig(guidance_scale=run.sample_guidance_scale).guided
    parts = ("tokenizer", "text_encoder") * bool(run.sample_prompts or guided)
    if run.sample_prompts and task_of(task).image:
        parts += ("vae", "image_encoder", "image_processor")
    encoders = spec_for_folder(encoder_dir).conditioner(encoder_dir, task, components=parts) if parts else None
    if run.sample_prompts:
        records = read_prompt_file(run.sample_prompts, task)[:run.sample_count]
        items = _encode_prompts(encoders, records, train_shape, cfg.data.text_len)
    else:
        items = _from_pairs(val_dataset, run.sample_count)
    negative = pad_text(encoders.text([WAN_NEGATIVE_PROMPT])[0], cfg.data.text_len) if guided else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"items": items, "negative": negative}, tmp)


class StepSampler:
    """Samples of the prepared prompts with the training weights (every rank calls `__call__`, rank 0 writes)."""

    def __init__(self, cfg, encoder_dir, out: Path, device, *, autocast: bool = False):
        state = torch.load(out / "samples" / "conditions.pt", weights_only=True)
        self.items, self.negative = state["items"], state["negative"]
        self.config = SamplingConfig(steps=cfg.run.sample_steps, shift=cfg.objective.shift,
                                     guidance_scale=cfg.run.sample_guidance_scale)
        self.encoder_dir, self.out, self.device, self.autocast = encoder_dir, out / "samples", device, autocast
        self.task, self.seed, self.vae = cfg.run.task, cfg.run.seed, None
        spec = spec_for_folder(encoder_dir)
        self.conditioner, self.fps = spec.conditioner, spec.geometry().fps

    def _decode(self, latents) -> np.ndarray:
        if self.vae is None:
            self.vae = self.conditioner(self.encoder_dir, self.task, self.device, components=("vae",),
                                   offload=self.device.type == "cuda")
        return self.vae.decode(latents)[0]

    @torch.no_grad()
    def __call__(self, model, step: int, log=None) -> Path:
        """Sample every prompt with `model` (the WanModel); rank 0 writes OUT/samples/step_N/ and logs the videos."""
        def on_device(t):
            return None if t is None else t[None].to(self.device, torch.float32)

        negative = on_device(self.negative)
        videos = []
        for k, item in enumerate(self.items):
            cond = Conditions(on_device(item["text"]), on_device(item["clip"]), on_device(item["cond"]))
            noise = initial_noise([self.seed + k], item["shape"]).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                latents = denoise(model, noise, cond, negative, self.config)
            if dist.get_rank() == 0:
                videos.append(self._decode(latents))
        folder = self.out / f"step_{step:06d}"
        if dist.get_rank() == 0:
            folder.mkdir(parents=True, exist_ok=True)
            paths = [folder / f"{k}.mp4" for k in range(len(videos))]
            for path, video in zip(paths, videos):
                save_video(path, video, self.fps)
            prompts = {p.name: item["prompt"] for p, item in zip(paths, self.items)}
            (folder / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False, indent=1), encoding="utf-8")
            from PIL import Image

            Image.fromarray(contact_sheet(videos)).save(folder / "contact_sheet.png")
            if log is not None:
                log.log_videos(step, {f"samples/{k}": (video, path) for k, (video, path)
                                      in enumerate(zip(videos, paths))}, self.fps)
        return folder
