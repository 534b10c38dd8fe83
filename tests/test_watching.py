"""Watching a run: validation on held-out pairs, samples every N steps, and the DataLoader, on the tiny T2V recipe
(CP=2 on 2 gloo ranks). The fixtures' pairs have no test split, so the training pairs serve as `data.val_pairs`.

- validation twice on the same weights gives identical values; under DP=2 (3 pairs: one rank evaluates a repeat it
  drops) the means are those of every pair evaluated on one rank;
- `val/*` rows at the configured steps and at the end, TensorBoard events read back with tensorboard's own reader
  (the scalars and a video summary), mp4s decoding to the training videos' frame count, a contact sheet;
- with 2 loader workers, interrupted by SIGTERM after step 2 and resumed, the losses and `val/*` equal those of the
  straight run with no workers (and with sampling on) bit for bit;
- the loader's resume position is that of the batches consumed, whatever was prefetched, across epochs.
"""

import json
import os
import signal

import av
import numpy as np
import pytest
import torch
from PIL import Image
from test_train import ERRORS, argv, metrics, train

from megatron_wan.data.datasets import PairDataset
from megatron_wan.data.loader import PairLoader
from megatron_wan.data.samplers import BucketBatchSampler
from megatron_wan.parallel.local import run_local

STEPS = 4
WATCH = ("run.context_parallel=2", f"run.steps={STEPS}", "run.save_every=2", "run.validate_every=3",
         "run.validate_pairs=3")
SAMPLES = ("run.sample_every=4", "run.sample_steps=2", "run.sample_guidance_scale=2.0")
VAL = ("model_err_w", "model_err_l", "ref_err_w", "ref_err_l", "loss_dpo", "implicit_acc", "win_gap", "lose_gap",
       "s", "loss_sft")


@pytest.fixture(scope="module")
def val_pairs(encoded, tmp_path_factory):
    path = tmp_path_factory.mktemp("val") / "val.jsonl"
    path.write_text((encoded["t2v"] / "train.jsonl").read_text())
    return path


@pytest.fixture(scope="module")
def straight(models, encoded, val_pairs, tmp_path_factory):
    """4 steps with validation every 3 (so at 3 and at the end) and samples at step 4; no loader workers."""
    out = tmp_path_factory.mktemp("straight")
    summary = train(2, argv("t2v", models, encoded, out, *WATCH, *SAMPLES, "data.num_workers=0",
                            f"data.val_pairs={val_pairs}"))
    assert summary["steps"] == STEPS and summary["watch_seconds"]["sampling"] > 0
    return out


def _stopped_after(args, steps):
    """Train, sending this process SIGTERM once step `steps` is done (what SLURM's pre-emption does)."""
    from megatron_wan.config import load_config
    from megatron_wan.train import Trainer

    trainer = Trainer(load_config(args[1], args[2:]))
    step = trainer.train_step

    def train_step():
        out = step()
        if trainer.step + 1 == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    trainer.train_step = train_step
    return trainer.run()


def test_val_rows_tensorboard_videos_and_contact_sheet(straight):
    rows = [r for r in metrics(straight) if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in rows] == [3, 4]
    for row in rows:
        assert all(np.isfinite(row[f"val/{k}"]) for k in VAL) and row["val/seconds"] > 0
    assert [r["step"] for r in metrics(straight) if "loss" in r] == list(range(1, STEPS + 1))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("val/loss_dpo")] == [3, 4]
    assert events.Scalars("val/model_err_w")[-1].value == pytest.approx(rows[-1]["val/model_err_w"])
    assert "loss" in tags["scalars"] and "samples/seconds" in tags["scalars"]
    assert {"samples/0", "samples/1"} <= set(tags["images"])  # add_video writes an animated GIF image summary
    (video,) = events.Images("samples/0")
    assert video.step == 4 and video.encoded_image_string[:4] == b"GIF8" and (video.width, video.height) == (112, 64)

    folder = straight / "samples" / "step_000004"
    prompts = json.loads((folder / "prompts.json").read_text())
    assert sorted(prompts) == ["0.mp4", "1.mp4"] and len(set(prompts.values())) == 2  # two distinct prompts
    for name in prompts:
        with av.open(str(folder / name)) as f:
            frames = [fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)]
        assert len(frames) == 81 and frames[0].shape == (64, 112, 3)  # 21 latent frames: the training videos'
    sheet = Image.open(folder / "contact_sheet.png")
    assert sheet.size == (8 * 112, 2 * 64)  # 8 frames over time, one row a prompt


def test_workers_interrupted_and_resumed_equal_the_straight_run(straight, models, encoded, val_pairs, tmp_path):
    args = argv("t2v", models, encoded, tmp_path, *WATCH, "data.num_workers=2", "data.prefetch=2",
                f"data.val_pairs={val_pairs}")
    first = run_local(_stopped_after, 2, args, 3, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})[0]
    assert first["interrupted"] and first["steps"] == 3
    resumed = train(2, args)
    assert resumed["resumed_from"].endswith("step_000003") and resumed["steps"] == STEPS
    a, b = metrics(straight), metrics(tmp_path)
    assert [r["step"] for r in b if "loss" in r] == list(range(1, STEPS + 1))
    for k in ("loss", *ERRORS, "grad_norm"):  # bit for bit: workers = inline, resume exact, samples change nothing
        assert [r[k] for r in b if "loss" in r] == [r[k] for r in a if "loss" in r], k
    val_a = [(r["step"], {k: r[f"val/{k}"] for k in VAL}) for r in a if "val/s" in r]
    val_b = [(r["step"], {k: r[f"val/{k}"] for k in VAL}) for r in b if "val/s" in r]
    assert val_b == val_a and [s for s, _ in val_a] == [3, 4]


def _validate(args):
    """Validation of the initial weights twice, and every pair's errors evaluated here alone."""
    from megatron_wan.config import load_config
    from megatron_wan.data.loader import collate, to_pair_batch
    from megatron_wan.train import Trainer
    from megatron_wan.validation import VALIDATION_STEP, pair_seed

    trainer = Trainer(load_config(args[1], args[2:]))
    v, model, ref = trainer.validator, trainer.engine.model, trainer.reference
    first, second = v(model, ref), v(model, ref)
    rows = []
    for i in range(v.count):
        item = v.dataset[i]
        batch = to_pair_batch(collate([{**item, "index": pair_seed(item["id"])}]), v.device)
        sigma, eps = trainer.objective.flow.draw(VALIDATION_STEP, batch.sample_ids, batch.win.shape[1:])
        rows.append(trainer.objective.errors(model, ref, batch, sigma, eps))
    alone = trainer.objective.metrics(torch.cat(rows))
    return {"first": first, "second": second, "alone": {f"val/{k}": x for k, x in alone.items()}}


def test_validation_repeats_exactly_and_means_over_the_split_under_dp(models, encoded, val_pairs, tmp_path):
    args = argv("t2v", models, encoded, tmp_path, "run.context_parallel=1", "run.validate_every=1",
                f"data.val_pairs={val_pairs}")
    results = run_local(_validate, 2, args, env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    for r in results:
        assert r["first"] == r["second"]  # the same weights: identical
        assert r["first"] == pytest.approx(r["alone"], rel=1e-6, abs=1e-9)  # DP=2 with a padded pair = all pairs
    assert results[0]["first"] == results[1]["first"]


def test_loader_resumes_at_the_batches_consumed(encoded):
    dataset = PairDataset(encoded["t2v"])

    def loader(workers):
        return PairLoader(dataset, BucketBatchSampler(dataset.shapes, 1, seed=3), num_workers=workers, prefetch=2)

    inline = loader(0)
    straight = [next(inline) for _ in range(8)]  # 3 pairs: 8 batches cross two epochs
    first = loader(2)
    head = [next(first) for _ in range(4)]
    state = first.state_dict()
    assert first.sampler.state_dict() != state  # the workers have read ahead
    rest = loader(2)
    rest.load_state_dict(state)
    tail = [next(rest) for _ in range(4)]
    assert [b["id"] for b in head + tail] == [b["id"] for b in straight]
    for x, y in zip(head + tail, straight):
        assert all(torch.equal(x[k], y[k]) for k in ("winner_latent", "loser_latent", "text_emb"))


def test_missing_val_pairs_is_a_config_error(models, encoded, tmp_path):
    from megatron_wan.config import ConfigError, load_config
    from megatron_wan.validation import val_pairs_path

    args = argv("t2v", models, encoded, tmp_path, "run.validate_every=5")
    cfg = load_config(args[1], args[2:])
    with pytest.raises(ConfigError, match=r"data.val_pairs: .*test.jsonl is missing or empty"):
        val_pairs_path(cfg)  # the fixtures' test split is empty
    with pytest.raises(ConfigError, match="data.prefetch: expected >= 1"):
        load_config(None, ["data.prefetch=0"])
    assert val_pairs_path(load_config(args[1], args[2:] + ["run.validate_every=0"])) is None  # not needed
