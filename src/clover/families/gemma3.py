"""Gemma 3 text decoders: Qwen3's per-head QK-norm (Gemma's (1 + w) RMSNorm, kept as is), MQA, sliding-window layers.

Its softmax scale is ``query_pre_attn_scalar ** -0.5`` (the module's ``scaling``, which the site reads), and each
layer type has its own RoPE base, which arrives in ``position_embeddings``. V-O only; the V cache shrinks on sliding
and full layers alike.
"""

from __future__ import annotations

from .qwen3 import Qwen3


class Gemma3(Qwen3):
    name = "gemma3"
    model_types = ("gemma3_text",)
    examples = "Gemma 3 (text)"
