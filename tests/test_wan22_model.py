"""Wan 2.2 transformers (each A14B expert, TI2V-5B) equal diffusers' WanTransformer3DModel on the same random
weights (fp32), with one timestep per sample and one per token (TI2V), in one process and under CP=2 with a
frame count that does not split evenly."""

import pytest
import torch
from wan_reference import assert_forward_matches, assert_gradients_match, inputs, perturbed_reference, rel_err

from megatron_wan import parallel
from megatron_wan.model import WanModel
from megatron_wan.models.wan21.adapter import rename, split_tp
from megatron_wan.models.wan22 import DIFFUSERS_FOLDERS, EXPERTS, HIGH_NOISE, LOW_NOISE, PRESETS, SPEC, preset
from megatron_wan.models.wan22.adapter import FolderInfo, folder_info
from megatron_wan.models.wan22.tiny import write_original_transformers
from megatron_wan.parallel.local import run_local

TINY = [name for name in PRESETS if name.startswith("tiny-")]


def _per_token(x, cfg, seed=5, first_frame_zero=False):
    """[B, f*h*w] timesteps, frame-major as the tokens: random per token, or TI2V's image-to-video pattern
    (the first latent frame's tokens at 0, the others at the sample's t)."""
    b, f, h, w = x.shape[0], *(n // p for n, p in zip(x.shape[2:], cfg.patch_size))
    if first_frame_zero:
        t = torch.tensor([[700.0], [40.0]])[:b].expand(b, f * h * w).clone()
        t[:, : h * w] = 0
        return t
    return torch.rand(b, f * h * w, generator=torch.Generator().manual_seed(seed)) * 1000


@pytest.fixture(scope="module", params=TINY)
def pair(request):
    cfg = preset(request.param)
    ref = perturbed_reference(cfg)
    return cfg, ref, WanModel.from_diffusers(ref).eval()


def test_presets_are_wan21_architectures_with_the_released_shapes():
    t2v, i2v, ti2v = (preset(n) for n in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"))
    assert (t2v.dim, t2v.num_layers, t2v.in_dim, t2v.out_dim, t2v.image_dim) == (5120, 40, 16, 16, None)
    assert (i2v.model_type, i2v.in_dim, i2v.out_dim, i2v.has_image_tokens) == ("i2v", 36, 16, False)
    assert (ti2v.dim, ti2v.num_heads, ti2v.ffn_dim, ti2v.num_layers, ti2v.in_dim, ti2v.expand_timesteps) == \
        (3072, 24, 14336, 30, 48, True)


@pytest.mark.parametrize("timesteps", ["per_sample", "per_token", "first_frame_zero"])
def test_forward_matches_diffusers(pair, timesteps):
    cfg, ref, ours = pair
    x, t, text, clip = inputs(cfg, (3, 2, 3), timesteps=(700.0, 40.0))
    if timesteps != "per_sample":
        t = _per_token(x, cfg, first_frame_zero=timesteps == "first_frame_zero")
    assert_forward_matches(ref, ours, cfg, x, t, text, clip)


def test_per_token_timesteps_are_used_per_token(pair):
    """Changing one frame's timesteps changes the prediction; the same t on every token is the per-sample t."""
    cfg, _, ours = pair
    x, t, text, clip = inputs(cfg, (2, 2, 2), timesteps=(700.0, 40.0))
    tokens = _per_token(x, cfg, first_frame_zero=True)
    with torch.no_grad():
        flat = ours(x, t, text, clip)
        same = ours(x, t[:, None].expand_as(tokens), text, clip)
        first_zero = ours(x, tokens, text, clip)
    assert rel_err(same, flat) < 1e-6
    assert rel_err(first_zero, flat) > 1e-3


def test_gradients_match_diffusers_with_per_token_timesteps(pair):
    cfg, ref, ours = pair
    x, _, text, clip = inputs(cfg, (2, 3, 2), timesteps=(700.0, 40.0))
    assert_gradients_match(ref, ours, cfg, x, _per_token(x, cfg), text, clip)
    ours.zero_grad(set_to_none=True)


def test_bad_per_token_timesteps_are_named(pair):
    cfg, _, ours = pair
    x, t, text, clip = inputs(cfg, (2, 2, 2), timesteps=(700.0, 40.0))
    with pytest.raises(ValueError, match=r"per token expects \[B, f\*h\*w\] = \[2, 8\], found \[2, 7\]"):
        ours(x, torch.zeros(2, 7), text, clip)
    with pytest.raises(ValueError, match=r"expected a number, \[2\] or \[2, tokens\]"):
        ours(x, torch.zeros(3), text, clip)


FRAMES = 3  # over CP=2: 2 token frames on rank 0, 1 (and 1 of padding) on rank 1


def _cp_case(name, state_dict):
    """Whole-video output, input gradient and parameter gradients under this process's CP, plus the local-shard
    prediction (the training path), for per-token timesteps."""
    cfg = preset(name)
    model = WanModel.from_diffusers(state_dict, num_heads=cfg.num_heads)
    x, _, text, clip = inputs(cfg, (FRAMES, 2, 2), timesteps=(700.0, 40.0), text_len=9)
    t = _per_token(x, cfg)
    x = x.clone().requires_grad_()
    out = model(x, t, text, clip)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weight).sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        local, shard = model(x, t, text, clip, gather_output=False)
    first, n = shard.first_frame, shard.valid_latent_frames
    return out.detach(), x.grad, grads, local[:, :, :n], first, n


def _cp_worker(state_dicts):
    parallel.initialize(context_parallel=2)
    return {name: _cp_case(name, sd) for name, sd in state_dicts.items()}


def test_context_parallel_with_uneven_frames_matches_diffusers():
    refs = {name: perturbed_reference(preset(name)) for name in TINY}
    ranks = run_local(_cp_worker, 2, {name: ref.state_dict() for name, ref in refs.items()})
    for name, ref in refs.items():
        cfg = preset(name)
        x, _, text, clip = inputs(cfg, (FRAMES, 2, 2), timesteps=(700.0, 40.0), text_len=9)
        t = _per_token(x, cfg)
        xr = x.clone().requires_grad_()
        expected = ref(xr, t, text, clip, return_dict=False)[0]
        (expected * torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        ref_grads = dict(ref.named_parameters())
        for out, dx, _, local, first, n in (r[name] for r in ranks):
            assert rel_err(out, expected) < 1e-5, name
            assert rel_err(dx, xr.grad) < 1e-5, name  # replicated input: each rank has the whole gradient
            assert rel_err(local, expected[:, :, first:first + n]) < 1e-5, name
        assert [r[name][5] for r in ranks] == [2, 1]
        for k in ranks[0][name][2]:  # the CP gradient reduction sums the ranks' parameter gradients
            summed = ranks[0][name][2][k] + ranks[1][name][2][k]
            assert rel_err(summed, ref_grads[rename(k, "diffusers")].grad) < 1e-5, (name, k)


# -- loading: diffusers folders (transformer, transformer_2) and the original layout, TP slices --------------------

@pytest.fixture(scope="module")
def original(wan22_models, tmp_path_factory):
    """The same tiny transformers in the original Wan-AI layout (high_noise_model/, low_noise_model/)."""
    root = tmp_path_factory.mktemp("wan22-original")
    return {task: write_original_transformers(folder, root / task) for task, folder in wan22_models.items()}


def _diffusers_weights(folder, sub):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel.from_pretrained(folder, subfolder=sub)
    return ref, {k: v for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("task", ["t2v-a14b", "i2v-a14b", "ti2v"])
def test_each_expert_loads_from_both_layouts(wan22_models, original, task):
    info = folder_info(wan22_models[task])
    assert folder_info(original[task]) == FolderInfo("original", info.experts, info.boundary_ratio,
                                                     info.expand_timesteps)
    assert (info.experts, info.boundary_ratio, info.expand_timesteps) == {
        "t2v-a14b": (EXPERTS, 0.875, False), "i2v-a14b": (EXPERTS, 0.9, False), "ti2v": ((), None, True)}[task]
    loaded = {}
    for expert in info.experts or (None,):
        ref, _ = _diffusers_weights(wan22_models[task], DIFFUSERS_FOLDERS[expert or HIGH_NOISE])
        ours = SPEC.adapter.load(WanModel, wan22_models[task], "diffusers", {}, expert=expert).eval()
        from_original = SPEC.adapter.load(WanModel, original[task], None, {"expert": expert}).eval()
        assert ours.wan == from_original.wan
        assert ours.wan.expand_timesteps == info.expand_timesteps and ours.wan.is_i2v == (task == "i2v-a14b")
        theirs = from_original.state_dict()
        for k, v in ours.state_dict().items():
            assert k.endswith("_extra_state") or torch.equal(v, theirs[k]), k
        x, t, text, _ = inputs(ours.wan, (2, 2, 2), timesteps=(700.0, 40.0))
        with torch.no_grad():
            assert rel_err(ours(x, t, text), ref(x, t, text, return_dict=False)[0]) < 1e-5
        loaded[expert] = ours.state_dict()
    if info.experts:  # two different transformers, each from its own folder
        assert not torch.equal(loaded[HIGH_NOISE]["blocks.0.modulation"], loaded[LOW_NOISE]["blocks.0.modulation"])


def test_expert_choice_errors_name_the_folder(wan22_models, original):
    with pytest.raises(ValueError, match=r"holds two experts \['high_noise', 'low_noise'\]; pass expert="):
        SPEC.adapter.load(WanModel, wan22_models["t2v-a14b"], "diffusers", {})
    with pytest.raises(ValueError, match=r"no expert 'low_noise'; it holds one transformer"):
        SPEC.adapter.load(WanModel, wan22_models["ti2v"], "diffusers", {"expert": LOW_NOISE})
    with pytest.raises(ValueError, match="a Wan 2.2 folder in the original layout, asked to load it as diffusers"):
        SPEC.adapter.load(WanModel, original["t2v-a14b"], "diffusers", {"expert": HIGH_NOISE})


def _tp_worker(folders):
    parallel.initialize(tensor_parallel=2)
    return parallel.tp_rank(), {f"{name}/{e}": SPEC.adapter.load(WanModel, folder, None, {"expert": e}).state_dict()
                                for name, folder in folders.items() for e in EXPERTS}


def test_tensor_parallel_ranks_read_their_slices_of_each_expert(wan22_models, original):
    folders = {"diffusers": wan22_models["i2v-a14b"], "original": original["i2v-a14b"]}
    ranks = run_local(_tp_worker, 2, folders)
    for expert in EXPERTS:
        whole = SPEC.adapter.load(WanModel, folders["diffusers"], None, {"expert": expert})
        want = split_tp(whole.state_dict(), whole.wan, 2)
        for rank, got in ranks:
            for layout in folders:
                mine = got[f"{layout}/{expert}"]
                assert sorted(k for k in mine if not k.endswith("_extra_state")) == sorted(want[rank])
                for k, v in want[rank].items():
                    assert torch.equal(mine[k], v), (layout, expert, rank, k)


# -- export: merged transformer/ + transformer_2/, per-expert LoRA pairs ------------------------------------------

def _trained_expert(folder, expert, seed):
    """A LoRA run's Trained for one expert of a tiny A14B folder: random adapters on two modules of each block."""
    from megatron_wan.export import Trained
    from megatron_wan.models.wan22.adapter import _open_folder

    src, cfg, _ = _open_folder(folder, expert, "diffusers")
    g, rank, adapters = torch.Generator().manual_seed(seed), 4, {}
    for b in range(cfg.num_layers):
        for module, (i, o) in {"self_attention.linear_q": (cfg.dim, cfg.dim),
                               "mlp.linear_fc1": (cfg.dim, cfg.ffn_dim)}.items():
            adapters[f"blocks.{b}.{module}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.1
            adapters[f"blocks.{b}.{module}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.1
    config = {"run": {"finetune": "lora"}, "model": {"layout": "diffusers"}, "lora": {"rank": rank, "alpha": 8.0}}
    return Trained(folder, 1, config, cfg, src, adapters)


def test_expert_export_loads_in_diffusers_with_transformer_2(wan22_models, tmp_path):
    from diffusers import WanPipeline, WanTransformer3DModel
    from peft import PeftModel

    from megatron_wan.export import export_experts

    base = wan22_models["t2v-a14b"]
    trained = {e: _trained_expert(base, e, seed) for seed, e in enumerate(EXPERTS)}
    written = export_experts(trained, tmp_path, ["transformer", "peft", "diffusers", "comfyui"])
    assert written[LOW_NOISE]["transformer"] == tmp_path / "transformer_2"
    assert (written[LOW_NOISE]["comfyui"] / "lora.safetensors").is_file()
    merged = WanPipeline.from_pretrained(
        base, transformer=WanTransformer3DModel.from_pretrained(tmp_path / "transformer"),
        transformer_2=WanTransformer3DModel.from_pretrained(tmp_path / "transformer_2"))
    lora = WanPipeline.from_pretrained(base)
    lora.load_lora_weights(written[HIGH_NOISE]["diffusers"])
    lora.load_lora_weights(written[LOW_NOISE]["diffusers"], load_into_transformer_2=True)
    plain = WanPipeline.from_pretrained(base)
    cfg = preset("tiny-wan2.2-t2v-a14b")
    x, t, text, _ = inputs(cfg, (2, 2, 2), timesteps=(900.0, 300.0))

    def predict(model):
        with torch.no_grad():
            return model(x, t, text, return_dict=False)[0]

    for expert, sub in DIFFUSERS_FOLDERS.items():
        want = predict(getattr(lora, sub))  # diffusers' own LoRA loader on the base expert
        assert rel_err(predict(getattr(merged, sub)), want) < 1e-5, expert
        peft = PeftModel.from_pretrained(WanTransformer3DModel.from_pretrained(base, subfolder=sub),
                                         written[expert]["peft"])
        assert rel_err(predict(peft), want) < 1e-5, expert
        assert rel_err(predict(getattr(plain, sub)), want) > 1e-3, expert  # the adapters matter


def test_a_lone_diffusers_transformer_folder_loads_as_one_model(wan22_models):
    from megatron_wan.models.wan22.experts import load_denoiser

    sub = wan22_models["i2v-a14b"] / DIFFUSERS_FOLDERS[LOW_NOISE]
    assert folder_info(sub) == FolderInfo("diffusers", (), None, False)
    lone = load_denoiser(WanModel, sub, "diffusers")
    pair = load_denoiser(WanModel, wan22_models["i2v-a14b"])
    assert (pair.boundary_ratio, lone.wan.model_type) == (0.9, "i2v")
    for k, v in pair.low_noise.state_dict().items():
        assert k.endswith("_extra_state") or torch.equal(v, lone.state_dict()[k]), k
