"""Qwen3: Llama with QK-norm, an RMSNorm over each head's q and k (before RoPE). V-O only; Q-K is refused."""

from __future__ import annotations

from .llama import CloverLlamaAttention, Llama


class CloverQwen3Attention(CloverLlamaAttention):
    """Per-head q_norm / k_norm (kept from the original module) between the projections and RoPE."""

    def project_qk(self, hidden_states):
        batch, length, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(batch, length, -1, self.head_dim)).transpose(1, 2)
        return q, k


class Qwen3(Llama):
    name = "qwen3"
    model_types = ("qwen3",)
    examples = "Qwen3"
    qk_norm = True
    kept = ("q_norm", "k_norm")
    pruned_attention = CloverQwen3Attention
    legacy_names = ()
