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


@dataclass(frozen=True)
class Row:
    """One row of the family table: a tiny random model of the family, and what to expect of it."""

    config: Callable[[], Any]  # the transformers config of a 2-layer model, built in code (never downloaded)
    model: str  # the transformers class name
    kind: str = "causal-lm"  # "causal-lm", "encoder", "speech-seq2seq" or "seq2seq-lm": inputs and auto class
    qk_exact: bool = True  # False where RoPE or QK-norm sits between Q and K (V-O only)
    real: str = ""  # the real checkpoint tested elsewhere, for README's family table ("" = tiny random weights)
    latent_cache: bool = False  # the KV cache holds a latent shared by all heads (MLA): per-head pruning keeps it


_LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, init_std=0.1)  # fmt: skip
_FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, bos_token_id=1, eos_token_id=2)  # fmt: skip

# The family table: every family-level test runs over it, so a new family gets them all by adding one row.
FAMILY_TABLE: dict[str, Row] = {
    "gpt2": Row(lambda: tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                                      eos_token_id=2), "GPT2LMHeadModel"),
    "llama": Row(lambda: tf.LlamaConfig(**_LLAMA), "LlamaForCausalLM", qk_exact=False, real="smollm2-135m"),
    "llama-mha": Row(lambda: tf.LlamaConfig(**{**_LLAMA, "num_key_value_heads": 4}, attention_bias=True),
                     "LlamaForCausalLM", qk_exact=False),
    "mistral": Row(lambda: tf.MistralConfig(**_LLAMA, sliding_window=4), "MistralForCausalLM", qk_exact=False),
    "mixtral": Row(lambda: tf.MixtralConfig(**_LLAMA, num_local_experts=4, num_experts_per_tok=2),
                   "MixtralForCausalLM", qk_exact=False),
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
    "falcon-alibi": Row(lambda: tf.FalconConfig(**_FALCON, multi_query=False, alibi=True, bias=True,
                                                parallel_attn=False), "FalconForCausalLM"),
    "t5": Row(lambda: tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=8, d_ff=128, num_layers=2,
                                  num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                  relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0,
                                  eos_token_id=1), "T5ForConditionalGeneration", kind="seq2seq-lm"),
    # MLA: dense MLPs in V2 (MoE's grouped_mm rejects float64 on CPU), a float32 MoE layer and yarn scaling in V3
    **{name: Row(lambda config=config, extra=extra: getattr(tf, config)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=64,
        pad_token_id=0,
        **extra), model, latent_cache=True) for name, config, model, extra in [
        ("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM",
         dict(q_lora_rank=None, attention_bias=True, first_k_dense_replace=2)),
        ("deepseek_v2-qlora", "DeepseekV2Config", "DeepseekV2ForCausalLM",
         dict(q_lora_rank=24, first_k_dense_replace=2)),
        ("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
         dict(q_lora_rank=24, first_k_dense_replace=1, n_group=1, topk_group=1, rope_parameters={
             "rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 32,
             "mscale_all_dim": 1.0})),
    ]},
}  # fmt: skip


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random model of the given family row, float32, eval mode, biases randomised."""
    torch.manual_seed(seed)
    row = FAMILY_TABLE[arch]
    config = row.config()
    for name in ("initializer_range", "init_std"):  # larger random weights than the defaults: real spectra
        if hasattr(config, name):
            setattr(config, name, 0.1)
    model = getattr(tf, row.model)(config)
    _randomize_biases(model, seed)
    return model.eval()


def model_output(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    """Logits (causal LM, Whisper) or last hidden states (encoder) on fixed random inputs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    with torch.no_grad():
        if hasattr(model.config, "num_mel_bins"):  # speech encoder-decoder (Whisper)
            mels = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=generator)
            return model(input_features=mels, decoder_input_ids=ids[:, :8]).logits
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :8]).logits
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return output.logits if hasattr(output, "logits") else output.last_hidden_state


TINY_ARCHS = list(FAMILY_TABLE)
QK_EXACT = [arch for arch, row in FAMILY_TABLE.items() if row.qk_exact]
GENERATIVE = [arch for arch, row in FAMILY_TABLE.items() if row.kind != "encoder"]


def qk_ratio(arch: str, ratio: float) -> float:
    """``ratio`` where the family's Q-K is exact, else 0 (V-O only)."""
    return ratio if FAMILY_TABLE[arch].qk_exact else 0.0


def auto_class(arch: str) -> type:
    """The transformers auto class that loads a checkpoint of this row."""
    from clover.io import AUTO_CLASS  # not at import: fresh-process tests import this file without clover

    return getattr(tf, AUTO_CLASS[FAMILY_TABLE[arch].kind])


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param
