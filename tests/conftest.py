"""Tiny random models built from transformers config classes, one per adapter family (never downloaded)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers as tf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

VOCAB = 96


def _randomize_biases(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises biases to zero; random ones exercise the bias paths of the factorization
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def _randomize_layer_scales(model: torch.nn.Module, seed: int) -> None:
    # per-channel scales after an attention (DINOv2's layer_scale1.lambda1) start as one constant; random ones
    # exercise their fold into the output projection
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lambda1"):
                param.copy_(0.2 + 1.8 * torch.rand(param.shape, generator=generator))


def image_inputs(config: Any, generator: torch.Generator, batch: int = 2, length: int = 12) -> dict[str, torch.Tensor]:
    """Random ``pixel_values`` for a model that reads images (its config, or its ``vision_config``, has an
    ``image_size``); {} for the others. Tiled images (Mllama's ``max_num_tiles``) also get their aspect ratios and
    the cross-attention mask of ``length`` text tokens: sample 0 a 1x2 image, the others one tile and a padded one."""
    vision = getattr(config, "vision_config", None) or config
    if not hasattr(vision, "image_size"):
        return {}
    size = vision.image_size
    if hasattr(vision, "max_num_tiles"):
        tiles = vision.max_num_tiles
        shape = (batch, 1, tiles, vision.num_channels, size, size)  # (B, images, tiles, C, H, W)
        used = torch.tensor([tiles] + [1] * (batch - 1))
        ratio_ids = [1 + vision.supported_aspect_ratios.index([1, int(n)]) for n in used]  # 0 means no image
        mask = (torch.arange(tiles) < used[:, None]).long()[:, None]  # (B, images, tiles)
        return {
            "pixel_values": torch.randn(shape, generator=generator),
            "aspect_ratio_ids": torch.tensor(ratio_ids)[:, None],
            "aspect_ratio_mask": mask,
            "cross_attention_mask": mask[:, None].expand(batch, length, 1, tiles),
        }
    return {"pixel_values": torch.randn(batch, vision.num_channels, size, size, generator=generator)}


def _randomize_gates(model: torch.nn.Module, seed: int) -> None:
    # scalar tanh gates (Mllama's gate_attn, cross_attn_attn_gate, ...) start at 0 in transformers, which would
    # switch the cross-attention off; random ones of alternating sign exercise it and their fold into O
    generator = torch.Generator().manual_seed(seed)
    gates = [p for name, p in model.named_parameters() if p.numel() == 1 and "gate" in name.rsplit(".", 1)[-1]]
    with torch.no_grad():
        for index, param in enumerate(gates):
            param.fill_((-1) ** index * (0.3 + 1.2 * float(torch.rand(1, generator=generator))))


@dataclass(frozen=True)
class Row:
    """One row of the family table: a tiny random model of the family, and what to expect of it."""

    config: Callable[[], Any]  # the transformers config of a 2-layer model, built in code (never downloaded)
    model: str  # the transformers class name
    kind: str = "causal-lm"  # "causal-lm", "encoder", "vision", "speech-seq2seq" or "seq2seq-lm": inputs, auto class
    qk_exact: bool = True  # False where RoPE or QK-norm sits between Q and K (V-O only)
    real: str = ""  # the real checkpoint tested elsewhere, for README's family table ("" = tiny random weights)
    latent_cache: bool = False  # the KV cache holds a latent shared by all heads (MLA): per-head pruning keeps it
    # stacks whose Q-K is exact in a family whose other stacks' is not: Q-K prunes there with PruneConfig(stacks=...)
    qk_exact_stacks: tuple[str, ...] = ()
    # the library of ``model``: a "diffusers" row's config() is the model's init arguments (a diffusers model has no
    # transformers config, auto class, generation or tokenizer; kind "unet", the CLI's LoadedModel kind for it)
    library: str = "transformers"
    # the checkpoint save_pretrained writes streams layer by layer (False: transformers converts stored tensors on
    # load, e.g. fuses MoE experts' per-expert weights into one tensor, which no single layer read can do)
    streams: bool = True


_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.1)  # fmt: skip
_FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=32, mscale_all_dim=1.0)
_VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14)
_TEXT_TOWER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=16, projection_dim=32, bos_token_id=1, eos_token_id=2)  # fmt: skip

# The family table: every family-level test runs over it, so a new family gets them all by adding one row.
FAMILY_TABLE: dict[str, Row] = {
    "gpt2": Row(lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                                      eos_token_id=2), "GPT2LMHeadModel"),
    "llama": Row(lambda: tf.LlamaConfig(**_LLAMA), "LlamaForCausalLM", qk_exact=False, real="smollm2-135m"),
    # a softmax scale (attention_multiplier 0.3) that is not 1/sqrt(head_dim) = 0.25
    "granite": Row(lambda: tf.GraniteConfig(**_LLAMA, attention_multiplier=0.3, residual_multiplier=0.5,
                                            embedding_multiplier=2.0, logits_scaling=4.0), "GraniteForCausalLM",
                   qk_exact=False),
    "llama-mha": Row(lambda: tf.LlamaConfig(**{**_LLAMA, "num_key_value_heads": 4}, attention_bias=True),
                     "LlamaForCausalLM", qk_exact=False),
    "mistral": Row(lambda: tf.MistralConfig(**_LLAMA, sliding_window=4), "MistralForCausalLM", qk_exact=False),
    "mixtral": Row(lambda: tf.MixtralConfig(**_LLAMA, num_local_experts=4, num_experts_per_tok=2),
                   "MixtralForCausalLM", qk_exact=False, streams=False),
    "qwen2": Row(lambda: tf.Qwen2Config(**_LLAMA), "Qwen2ForCausalLM", qk_exact=False),
    "qwen3": Row(lambda: tf.Qwen3Config(**_LLAMA, head_dim=16), "Qwen3ForCausalLM", qk_exact=False),
    "gemma3": Row(lambda: tf.Gemma3TextConfig(**{**_LLAMA, "num_key_value_heads": 1}, head_dim=16,
                                              query_pre_attn_scalar=16, sliding_window=4, pad_token_id=0,
                                              layer_types=["sliding_attention", "full_attention"], bos_token_id=2,
                                              eos_token_id=1), "Gemma3ForCausalLM", qk_exact=False,
                  real="gemma3-270m"),
    "olmo2": Row(lambda: tf.Olmo2Config(**_LLAMA, pad_token_id=0, bos_token_id=None, eos_token_id=1),
                 "Olmo2ForCausalLM", qk_exact=False),
    "opt": Row(lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                    pad_token_id=1, bos_token_id=2, eos_token_id=2), "OPTForCausalLM"),
    "phi3": Row(lambda: tf.Phi3Config(**_LLAMA, original_max_position_embeddings=64, partial_rotary_factor=0.75,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2), "Phi3ForCausalLM"),
    "gpt_neox": Row(lambda: tf.GPTNeoXConfig(**{k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"},
                                             rotary_pct=0.25), "GPTNeoXForCausalLM"),
    "gptj": Row(lambda: tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64,
                                      bos_token_id=1, eos_token_id=2), "GPTJForCausalLM"),
    "bert": Row(lambda: tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64), "BertModel", kind="encoder",
                real="minilm-l6"),
    "whisper": Row(lambda: tf.WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2,
                                            decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                            encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=16,
                                            max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2, init_std=0.1),
                   "WhisperForConditionalGeneration", kind="speech-seq2seq", real="whisper-tiny.en, whisper-base"),
    "bart": Row(lambda: tf.BartConfig(**_SEQ2SEQ), "BartForConditionalGeneration", kind="seq2seq-lm"),
    "marian": Row(lambda: tf.MarianConfig(**_SEQ2SEQ), "MarianMTModel", kind="seq2seq-lm"),
    "falcon": Row(lambda: tf.FalconConfig(**_FALCON, multi_query=True, parallel_attn=True, bias=False),
                  "FalconForCausalLM", qk_exact=False),
    "falcon-gqa": Row(lambda: tf.FalconConfig(**_FALCON, num_kv_heads=2, new_decoder_architecture=True),
                      "FalconForCausalLM", qk_exact=False),
    "falcon-rope": Row(lambda: tf.FalconConfig(**_FALCON, multi_query=False, bias=True, parallel_attn=False),
                       "FalconForCausalLM", qk_exact=False),  # each head's [q | k | v] rows, with RoPE
    "falcon-alibi": Row(lambda: tf.FalconConfig(**_FALCON, multi_query=False, alibi=True, bias=True,
                                                parallel_attn=False), "FalconForCausalLM"),
    "t5": Row(lambda: tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=128, num_layers=2,
                                  num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                  relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0,
                                  eos_token_id=1), "T5ForConditionalGeneration", kind="seq2seq-lm"),
    "mt5": Row(lambda: tf.MT5Config(vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=2,
                                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=0.1),
               "MT5ForConditionalGeneration", kind="seq2seq-lm"),
    # image encoders read pixel_values (28x28: 4 patches of 14); build_tiny randomises DINOv2's layer scales
    "vit": Row(lambda: tf.ViTConfig(**_VISION, intermediate_size=128), "ViTModel", kind="vision"),
    "dinov2": Row(lambda: tf.Dinov2Config(**_VISION, mlp_ratio=2), "Dinov2Model", kind="vision", real="dinov2-small"),
    "dinov2-registers": Row(lambda: tf.Dinov2WithRegistersConfig(**_VISION, mlp_ratio=2, num_register_tokens=4),
                            "Dinov2WithRegistersModel", kind="vision"),
    # text-image models read input_ids and pixel_values; CLIP's text tower is causal, SigLIP's is not
    "clip": Row(lambda: tf.CLIPConfig(text_config=_TEXT_TOWER, vision_config={**_VISION, "intermediate_size": 128},
                                      projection_dim=32), "CLIPModel", kind="encoder"),
    "siglip": Row(lambda: tf.SiglipConfig(text_config=_TEXT_TOWER, vision_config={**_VISION, "intermediate_size": 128}),
                  "SiglipModel", kind="encoder"),
    # a tower saved alone (the model_types clip_text_model, clip_vision_model, siglip_text_model, siglip_vision_model)
    **{f"{name}_{side}": Row(lambda config=config, side=side: getattr(tf, f"{config}{side.title()}Config")(
        **(_TEXT_TOWER if side == "text" else {**_VISION, "intermediate_size": 128})),
        f"{config}{side.title()}Model", kind="encoder" if side == "text" else "vision")
       for name, config in (("clip", "CLIP"), ("siglip", "Siglip")) for side in ("text", "vision")},
    # LLaMA-3.2-Vision: 2 local + 1 gated global vision layers (head_dim 8), text layers self / cross / self (GQA
    # 4/2, head_dim 16); images of up to 2 tiles of 5 patches; Q-K exact in the vision stack only
    "mllama": Row(lambda: tf.MllamaConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
                           intermediate_size=64, vision_output_dim=64, image_size=28, patch_size=14, max_num_tiles=2,
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                           initializer_range=0.1),
        text_config=dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1],
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.1),
        image_token_index=VOCAB), "MllamaForConditionalGeneration", kind="image-text-to-text", qk_exact=False,
        qk_exact_stacks=("vision",)),
    # MLA: dense MLPs in V2 (MoE's grouped_mm rejects float64 on CPU), a float32 MoE layer and yarn scaling in V3
    **{name: Row(lambda config=config, extra=extra: getattr(tf, config)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=64,
        pad_token_id=0,
        **extra), model, latent_cache=True, streams=dense) for name, config, model, dense, extra in [
        ("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", True,
         dict(q_lora_rank=None, attention_bias=True, first_k_dense_replace=2)),
        ("deepseek_v2-qlora", "DeepseekV2Config", "DeepseekV2ForCausalLM", True,
         dict(q_lora_rank=24, first_k_dense_replace=2, rope_parameters=dict(_YARN))),
        ("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", False,
         dict(q_lora_rank=24, first_k_dense_replace=1, n_group=1, topk_group=1, rope_parameters=dict(_YARN))),
        # V3 without a query latent, its RoPE dims rotated as halves rather than interleaved pairs
        ("deepseek_v3-dense", "DeepseekV3Config", "DeepseekV3ForCausalLM", True,
         dict(q_lora_rank=None, first_k_dense_replace=2, n_group=1, topk_group=1, rope_interleave=False)),
    ]},
}  # fmt: skip

# SDXL-like UNet (families.md (c)): text_time conditioning, 2 transformer layers in the inner blocks, attn1 self and
# attn2 cross (K/V from 32-wide text states), 4 heads of 16 dims, 8x8 latents (attention on 4x4 after one downsample);
# its tests skip where diffusers (the optional extra "diffusion") is not installed
_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
             attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=32,
             norm_num_groups=16, use_linear_projection=True, addition_embed_type="text_time",
             addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)  # fmt: skip
FAMILY_TABLE["unet"] = Row(lambda: dict(_UNET), "UNet2DConditionModel", kind="unet", library="diffusers")


def unet_inputs(config: Any, generator: torch.Generator, batch: int = 2) -> dict[str, Any]:
    """One denoising step's inputs for a diffusers UNet with text_time conditioning (SDXL): latents, timesteps, text
    token states with the last 2 tokens of sample 1 masked out, pooled text embedding and the 6 size/crop ids."""
    side = config.sample_size
    mask = torch.ones(batch, 7)
    mask[1:, -2:] = 0
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return {
        "sample": torch.randn(batch, config.in_channels, side, side, generator=generator),
        "timestep": torch.tensor([10, 500] * batch)[:batch],
        "encoder_hidden_states": torch.randn(batch, 7, config.cross_attention_dim, generator=generator),
        "encoder_attention_mask": mask,
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.randn(batch, 6, generator=generator),
        },
    }


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random model of the given family row, float32, eval mode, biases randomised."""
    torch.manual_seed(seed)
    row = FAMILY_TABLE[arch]
    config = row.config()
    for name in ("initializer_range", "init_std"):  # larger random weights than the defaults: real spectra
        if hasattr(config, name):
            setattr(config, name, 0.1)
    if row.library == "diffusers":
        diffusers = pytest.importorskip("diffusers", reason="the optional extra 'diffusion' is not installed")
        model = getattr(diffusers, row.model)(**config)
    else:
        model = getattr(tf, row.model)(config)
    _randomize_biases(model, seed)
    _randomize_layer_scales(model, seed)
    _randomize_gates(model, seed)
    return model.eval()


def numeric_modes() -> dict[str, str]:
    """The process-wide torch settings that change a float32 forward's numbers (threads, reduced-precision
    matmuls, default dtype): a fresh-process comparison states them so that a mismatch names its cause."""
    modes = {
        "threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
    }
    for backend in ("mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn"):  # torch >= 2.9 spells precision per backend
        owner = torch.backends
        for part in backend.split("."):
            owner = getattr(owner, part, None)
        modes[backend] = getattr(owner, "fp32_precision", None)
    return {name: str(value) for name, value in modes.items()}


def model_output(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    """Logits (causal LM, Whisper), last hidden states (encoder) or both towers' states and embeddings (text-image)
    on fixed random inputs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    with torch.no_grad():
        if isinstance(model.config, dict):  # diffusers' frozen config: a UNet's noise prediction for one step
            return model(**unet_inputs(model.config, generator)).sample
        if hasattr(model.config, "num_mel_bins"):  # speech encoder-decoder (Whisper)
            mels = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=generator)
            return model(input_features=mels, decoder_input_ids=ids[:, :8]).logits
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :8]).logits
        images = image_inputs(model.config, generator)
        if images and not hasattr(model.config, "text_config"):  # image encoder (ViT, DINOv2)
            return model(**images).last_hidden_state
        if "cross_attention_mask" in images:  # image-text-to-text (Mllama): the text, its first token the image's
            ids[:, 0] = model.config.image_token_index
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), **images).logits
        if images:  # text-image model (CLIP, SigLIP): both towers' hidden states and the embeddings they compare
            output = model(input_ids=ids, **images)
            towers = (output.text_model_output, output.vision_model_output)
            return torch.cat([*(t.last_hidden_state.flatten(1) for t in towers), output.text_embeds,
                              output.image_embeds], dim=1)  # fmt: skip
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return output.logits if hasattr(output, "logits") else output.last_hidden_state


TINY_ARCHS = list(FAMILY_TABLE)
QK_EXACT = [arch for arch, row in FAMILY_TABLE.items() if row.qk_exact]
GENERATIVE = [arch for arch, row in FAMILY_TABLE.items() if row.kind not in ("encoder", "vision", "unet")]


def qk_ratio(arch: str, ratio: float) -> float:
    """``ratio`` where the family's Q-K is exact, else 0 (V-O only)."""
    return ratio if FAMILY_TABLE[arch].qk_exact else 0.0


def auto_class(arch: str, *, pruned: bool = False) -> type:
    """The transformers auto class that loads a checkpoint of this row (``pruned``: a pruned one, whose modeling
    code the auto class finds through the config's auto_map)."""
    from clover.io import AUTO_CLASS  # not at import: fresh-process tests import this file without clover

    if FAMILY_TABLE[arch].library == "diffusers":  # its own class (diffusers' AutoModel refuses Path arguments)
        import diffusers

        return getattr(diffusers, FAMILY_TABLE[arch].model)
    auto = getattr(tf, AUTO_CLASS[FAMILY_TABLE[arch].kind])
    # a config the auto class has no entry for (a SigLIP text tower alone) loads through its own class. Asked of
    # transformers' own table: loading a pruned one registers its remote class there for the rest of the process
    if pruned or FAMILY_TABLE[arch].config().model_type in auto._model_mapping._model_mapping:
        return auto
    return getattr(tf, FAMILY_TABLE[arch].model)


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param
