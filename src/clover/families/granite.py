"""IBM Granite (3.x): Llama whose softmax scale is ``attention_multiplier`` rather than 1/√head_dim (read from the
module's ``scaling``, as for every Llama), with multipliers on the embeddings, residuals and logits that sit
outside attention. V-O only; Q-K is refused (RoPE)."""

from __future__ import annotations

from .llama import Llama


class Granite(Llama):
    name = "granite"
    model_types = ("granite",)
    examples = "Granite"
    legacy_names = ()
