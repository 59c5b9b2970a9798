"""LLaMA-style decoders: Llama, SmolLM2, Mistral (sliding window), Mixtral (MoE in the MLP only), Qwen2 (q/k/v biases).

Separate q/k/v/o_proj, GQA, full RoPE between Q and K: V-O is exact, Q-K is not (only its per-head QR form, for
fine-tuning). The cache holds (B, KV heads, T, d_h) roped keys and values; a sliding window only changes the mask
and how many tokens the cache keeps, both of which the pruned attention takes from transformers as they are.
"""

from __future__ import annotations

from torch import nn

from ..modeling_clover import PrunedAttention
from .base import AttentionSite, Family


class CloverLlamaAttention(PrunedAttention):
    """Llama self-attention with pruned V-O dims; Q and K keep every dim because RoPE acts between them."""

    def project_qk(self, hidden_states):
        """(B, H, L, d_h) queries and (B, G, L, d_h) keys before RoPE: the hook a QK-norm family overrides."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        return q, k

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, length, _ = hidden_states.shape
        q, k = self.project_qk(hidden_states)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q = q.transpose(1, 2).reshape(batch, length, -1)
        k = self.layout.cache_entry(k.transpose(1, 2).reshape(batch, length, -1), "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self._attend(q, k, v, attention_mask)
        return self.o_proj(out), weights


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "mixtral", "qwen2")
    examples = "Llama, SmolLM2, Mistral, Mixtral, Qwen2"
    positional = "rope"
    pruned_attention = CloverLlamaAttention
    legacy_names = ("llama",)
    caches = "V"

    def attention_sites(self, model: nn.Module) -> list[AttentionSite]:
        config = getattr(model.config, "text_config", None) or model.config
        sites = []
        for name, module in self.attention_modules(model, "q_proj", "k_proj", "v_proj", "o_proj"):
            sites.append(
                self.site(
                    name=name,
                    stack="decoder",
                    layer_index=module.layer_idx,
                    module=module,
                    **self.separate_projections(module),
                    scaling=module.scaling,  # Gemma 3: query_pre_attn_scalar ** -0.5, not head_dim's
                    dropout=float(module.attention_dropout),
                    is_causal=bool(getattr(module, "is_causal", True)),  # Gemma 3 can be bidirectional
                    num_heads=config.num_attention_heads,
                    num_kv_heads=config.num_key_value_heads,
                    head_dim=module.head_dim,
                )
            )
        return sites
