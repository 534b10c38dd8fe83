"""`make demo MODEL=wan2.2-ti2v`, reduced (one clip, 17 frames, 2 steps): every stage on real footage with a tiny
random Wan 2.2 TI2V-5B folder, in TI2V's format (sides / 32, 24 fps) and its 48-channel VAE latents; the export loads
in diffusers and `eval sample` takes the run."""

import json

import av
import torch

from launch.demo import main
from tests.test_demo import PREFERENCE_METRICS


def test_reduced_wan22_ti2v_demo(tmp_path):
    report = main(["--model", "wan2.2-ti2v", "--out", str(tmp_path), "--steps", "2", "--frames", "17",
                   "--clips", "bigbuckbunny"])
    text = report.read_text()
    assert "# megatron_wan demo (Wan 2.2 TI2V-5B, T2V)" in text and "--format wan2.2-ti2v --min-side 64" in text
    assert "configs/tiny-wan2.2-ti2v-regdpo.yaml" in text and "(24 fps)" in text
    (normalized,) = (tmp_path / "normalize" / "videos").iterdir()
    with av.open(str(normalized)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height, float(s.average_rate), sum(1 for _ in c.decode(s))) == (128, 64, 24.0, 17)

    work = tmp_path / "t2v"
    assert json.loads((work / "tiny-wan" / "model_index.json").read_text())["expand_timesteps"] is True
    from megatron_wan.data.datasets import PairDataset

    pair = PairDataset(work / "encoded")[0]
    # the Wan 2.2 VAE: 48 channels, 17 frames / 4 in time (5), 64 x 128 / 16 in space
    assert tuple(pair["winner_latent"].shape) == tuple(pair["loser_latent"].shape) == (48, 5, 4, 8)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2] and all(k in r for r in train for k in PREFERENCE_METRICS)
    assert [r["step"] for r in rows if "val/loss" in r] == [1, 2]
    assert (tmp_path / "samples_step_000002.png").stat().st_size > 1000  # sampled while training
    with av.open(str(tmp_path / "sample.mp4")) as c:
        s = c.streams.video[0]
        assert (sum(1 for _ in c.decode(s)), float(s.average_rate)) == (17, 24.0)

    assert sorted(p.name for p in (work / "export").iterdir()) == ["comfyui", "diffusers", "peft", "transformer"]
    from diffusers import WanTransformer3DModel

    trained = WanTransformer3DModel.from_pretrained(work / "export" / "transformer")
    base = WanTransformer3DModel.from_pretrained(work / "tiny-wan", subfolder="transformer")
    assert trained.config.in_channels == trained.config.out_channels == 48
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed and all(k.startswith("blocks.") for k in changed)  # LoRA merged into the blocks' linears

    from megatron_wan.eval.__main__ import main as evaluate

    counts = evaluate(["sample", "--model", str(work / "tiny-wan"), "--pairs", str(work / "encoded" / "pairs.jsonl"),
                       "--checkpoint", f"RegDPO={work / 'train'}", "--no-base", "--out", str(tmp_path / "eval"),
                       "--frames", "17", "--steps", "2"])
    assert counts == {"RegDPO": 1}
