"""A tiny, randomly initialized Wan 2.1 checkpoint in diffusers layout, for tests and the CPU demo.

No weights can be downloaded in CI, so the real classes are built with tiny configs: WanTransformer3DModel
(our `tiny` / `tiny-i2v` presets), UMT5EncoderModel with a word-level tokenizer built here, AutoencoderKLWan,
and for I2V CLIPVisionModel with its CLIPImageProcessor. `write_tiny_wan` saves them through diffusers'
WanPipeline / WanImageToVideoPipeline, so the folder loads like a real one (`from_pretrained`).
"""

import json
from pathlib import Path

import torch

from megatron_wan.models.wan21.adapter import config_to_diffusers
from megatron_wan.models.wan21.config import preset

WORDS = ("a an the of in on at to with and is are into out over under from by big small white black red green "
         "blue yellow rabbit bird man woman child dog cat car bike road street city field meadow forest tree sky "
         "sun water river sea beach mountain walks runs rides flies steps jumps sits stands looks sunny bright "
         "dark slow fast camera view close wide shot scene video frame day night morning light its his her their "
         "burrow grass flower house window people person moving still talking phone").split()
TINY_PRESETS = {"t2v": "tiny", "i2v": "tiny-i2v"}


def tiny_tokenizer(words=WORDS):
    """A T5-style fast tokenizer (lower-cased words, `</s>` appended, `<pad>` = 0) over the vocabulary `words`."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(("<pad>", "</s>", "<unk>", *words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)


def tiny_text_encoder(tokenizer, text_dim: int):
    """A tiny random UMT5EncoderModel over `tokenizer`'s vocabulary with `text_dim` wide states."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def tiny_components(task: str = "t2v", seed: int = 0) -> dict:
    """The pipeline components of a tiny random Wan 2.1 model for `task` ('t2v' or 'i2v')."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if task not in TINY_PRESETS:
        raise ValueError(f"task: expected one of {sorted(TINY_PRESETS)}, found {task!r}")
    cfg = preset(TINY_PRESETS[task])
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    parts = {
        "transformer": WanTransformer3DModel(**config_to_diffusers(cfg)),
        "vae": AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True]),
        "text_encoder": tiny_text_encoder(tokenizer, cfg.text_dim),
        "tokenizer": tokenizer,
        "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                             num_train_timesteps=1000, flow_shift=3.0),
    }
    if task == "i2v":
        parts["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=cfg.image_dim, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=28, patch_size=14, projection_dim=cfg.image_dim))
        parts["image_processor"] = CLIPImageProcessor(size={"shortest_edge": 28},
                                                      crop_size={"height": 28, "width": 28})
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return parts


def tiny_pipeline(task: str = "t2v", seed: int = 0):
    """diffusers' WanPipeline (t2v) or WanImageToVideoPipeline (i2v) over `tiny_components`."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    cls = WanImageToVideoPipeline if task == "i2v" else WanPipeline
    return cls(**tiny_components(task, seed))


def save_tiny(directory, pipeline, task: str, seed: int, family: str) -> Path:
    """Save `pipeline(task, seed)` (a diffusers pipeline of tiny random components) at `directory`, marked as not
    `family`'s weights; an existing folder is kept."""
    directory = Path(directory)
    if (directory / "model_index.json").exists():
        return directory
    pipeline(task, seed).save_pretrained(directory)
    (directory / "TINY_RANDOM_WEIGHTS.json").write_text(json.dumps(
        {"task": task, "seed": seed, "note": f"randomly initialized tiny configs of the real classes, not {family}"}))
    return directory


def write_tiny_wan(directory, task: str = "t2v", seed: int = 0) -> Path:
    """Save a tiny random Wan 2.1 pipeline folder (diffusers layout) at `directory`; an existing one is kept."""
    return save_tiny(directory, tiny_pipeline, task, seed, "Wan 2.1")
