"""Tiny random models built from transformers config classes, one per adapter family (never downloaded)."""

from __future__ import annotations

import os

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


def build_tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer random model of the given family, float32, eval mode, biases randomised."""
    torch.manual_seed(seed)
    common = {"initializer_range": 0.1}
    if arch == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
        model = tf.GPT2LMHeadModel(config)
    elif arch in ("llama", "mistral", "qwen2"):
        cls_config, cls_model = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        }[arch]
        config = cls_config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
        model = cls_model(config)
    elif arch == "llama-mha":
        config = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            attention_bias=True,
            **common,
        )
        model = tf.LlamaForCausalLM(config)
    elif arch == "bert":
        config = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            **common,
        )
        model = tf.BertModel(config)
    elif arch == "whisper":
        config = tf.WhisperConfig(
            vocab_size=VOCAB,
            num_mel_bins=16,
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            max_source_positions=16,
            max_target_positions=32,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            init_std=0.1,
        )
        model = tf.WhisperForConditionalGeneration(config)
    else:
        raise ValueError(arch)
    _randomize_biases(model, seed)
    return model.eval()


def model_output(model: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    """Logits (causal LM, Whisper) or last hidden states (encoder) on fixed random inputs."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=generator)
    with torch.no_grad():
        if model.config.model_type == "whisper":
            mels = torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=generator)
            return model(input_features=mels, decoder_input_ids=ids[:, :8]).logits
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return output.logits if hasattr(output, "logits") else output.last_hidden_state


TINY_ARCHS = ["gpt2", "llama", "llama-mha", "mistral", "qwen2", "bert", "whisper"]


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request) -> str:
    return request.param
