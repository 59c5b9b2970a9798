"""OLMo 2: q_norm / k_norm are RMSNorms over all heads at once (width H·d_h), applied before the head split.

The norm couples the heads, so not even a per-head rescaling of Q or K is exact: V-O only; Q-K is refused.
"""

from __future__ import annotations

from .llama import CloverLlamaAttention, Llama


class CloverOlmo2Attention(CloverLlamaAttention):
    """q_norm / k_norm over the whole projection output (kept from the original module), then the head view."""

    def project_qk(self, hidden_states):
        batch, length, _ = hidden_states.shape
        q = self.q_norm(self.q_proj(hidden_states)).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states)).view(batch, length, -1, self.head_dim).transpose(1, 2)
        return q, k


class Olmo2(Llama):
    name = "olmo2"
    model_types = ("olmo2",)
    examples = "OLMo 2"
    qk_norm = True
    kept = ("q_norm", "k_norm")
    pruned_attention = CloverOlmo2Attention
    legacy_names = ()
