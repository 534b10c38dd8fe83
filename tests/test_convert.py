"""Conversion between diffusers, original Wan-AI and our layouts; TP split/merge; parameter counts."""

import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from wan_reference import inputs, perturbed_reference, rel_err

from megatron_wan.model import PRESETS, WanModel, preset
from megatron_wan.models.wan21.adapter import (
    config_to_diffusers,
    config_to_original,
    from_ours,
    merge_tp,
    param_table,
    split_tp,
    to_ours,
)


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", params=["tiny", "tiny-i2v"])
def ref(request):
    cfg = preset(request.param)
    return cfg, perturbed_reference(cfg)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_diffusers_round_trip_is_bit_exact(ref, tp):
    cfg, model = ref
    sd = model.state_dict()
    shards = [to_ours(sd, cfg, "diffusers", r, tp) for r in range(tp)]
    assert_bit_exact(from_ours(shards, cfg, "diffusers"), sd)
    assert_bit_exact(merge_tp(split_tp(merge_tp(shards, cfg), cfg, tp), cfg), merge_tp(shards, cfg))


def test_original_layout_agrees_with_diffusers_converter(ref):
    """Our original-layout names, fed to diffusers' own original->diffusers converter, give the model back."""
    cfg, model = ref
    sd = model.state_dict()
    original = from_ours(to_ours(sd, cfg, "diffusers"), cfg, "original")
    assert any(".self_attn.q." in k for k in original) and "head.head.weight" in original
    assert_bit_exact(convert_wan_transformer_to_diffusers(dict(original)), sd)
    assert_bit_exact(from_ours(to_ours(original, cfg, "original"), cfg, "original"), original)


def test_from_original_equals_from_diffusers(ref, tmp_path):
    cfg, model = ref
    original = from_ours(to_ours(model.state_dict(), cfg, "diffusers"), cfg, "original")
    x, t, text, clip = inputs(cfg, (2, 2, 3))
    with torch.no_grad():
        expected = WanModel.from_diffusers(model)(x, t, text, clip)
        from_dict = WanModel.from_original(original, num_heads=cfg.num_heads)(x, t, text, clip)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in original.items()}, tmp_path / "diffusion_pytorch_model.safetensors")
        (tmp_path / "config.json").write_text(json.dumps(config_to_original(cfg)))
        from_folder = WanModel.from_original(tmp_path)(x, t, text, clip)
    assert torch.equal(from_dict, expected) and torch.equal(from_folder, expected)


def test_from_sharded_diffusers_folder(ref, tmp_path):
    cfg, model = ref
    model.save_pretrained(tmp_path / "transformer", max_shard_size="50KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 2
    x, t, text, clip = inputs(cfg, (1, 2, 2))
    with torch.no_grad():
        expected = model(x, t, text, clip, return_dict=False)[0]
        for folder in (tmp_path, tmp_path / "transformer"):  # a pipeline folder or its transformer/
            assert rel_err(WanModel.from_diffusers(folder)(x, t, text, clip), expected) < 1e-5


def test_missing_keys_are_all_listed(ref):
    cfg, model = ref
    sd = model.state_dict()
    gone = ["blocks.1.attn1.to_q.weight", "proj_out.bias"]
    for k in gone:
        del sd[k]
    with pytest.raises(KeyError) as e:
        to_ours(sd, cfg, "diffusers")
    assert all(k in str(e.value) for k in gone) and "2 diffusers key(s) missing" in str(e.value)


def test_wrong_shape_names_key_and_shapes(ref):
    cfg, model = ref
    sd = model.state_dict()
    sd["blocks.0.ffn.net.0.proj.weight"] = torch.zeros(3, cfg.dim)
    with pytest.raises(ValueError, match=rf"blocks.0.ffn.net.0.proj.weight: expected shape \[{cfg.ffn_dim}, "
                                         rf"{cfg.dim}\], found \[3, {cfg.dim}\]"):
        to_ours(sd, cfg, "diffusers")


def test_unexpected_keys_are_refused(ref):
    cfg, model = ref
    sd = dict(model.state_dict(), **{"blocks.0.attn1.surprise.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="surprise"):
        to_ours(sd, cfg, "diffusers")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_equal_diffusers_on_meta(name):
    cfg = preset(name)
    with torch.device("meta"):
        ours = WanModel(cfg)
        ref = WanTransformer3DModel(**config_to_diffusers(cfg))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count == sum(torch.Size(p.shape).numel() for p in param_table(cfg))
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in from_ours(
        {p.name: torch.empty(p.shape, device="meta") for p in param_table(cfg)}, cfg, "diffusers").items()} == shapes


def test_preset_sizes_are_the_published_ones():
    billions = {name: sum(torch.Size(p.shape).numel() for p in param_table(preset(name))) / 1e9
                for name in PRESETS if name.startswith("wan")}
    assert 1.3 < billions["wan2.1-t2v-1.3b"] < 1.5
    assert 14.0 < billions["wan2.1-t2v-14b"] < 14.5
    assert 16.0 < billions["wan2.1-i2v-14b-720p"] < 16.8 and billions["wan2.1-i2v-14b-480p"] == billions[
        "wan2.1-i2v-14b-720p"]


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(KeyError, match="wan2.1-t2v-14b"):
        preset("wan2.2-t2v-5b")
