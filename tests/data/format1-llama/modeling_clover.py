"""Attention with pruned, per-head Q-K and V-O dims (CLOVER), for transformers models.

Self-contained on purpose: it imports only torch and transformers, because `clover prune` copies this file
into every pruned checkpoint, where ``from_pretrained(DIR, trust_remote_code=True)`` loads it without clover.

Each pruned attention keeps, for every KV group j, ``qk_dims[j]`` Q-K dims (in K and in each of the group's
query heads) and ``vo_dims[j]`` V-O dims (in V and in each query head's rows of O). Projections are packed:
head blocks of their own widths, concatenated. The KV cache holds exactly the kept dims: (B, G, T, d) per
KV group when every group keeps the same dims, else one cache "head" of width sum(qk_dims) for K, sum(vo_dims)
for V. Heads with equal dims are computed together by torch's
scaled_dot_product_attention; the softmax scale is the original model's, never recomputed from pruned dims.
When the caller asks for ``output_attentions``, attention is computed explicitly instead and the per-head
probabilities (B, num_heads, L, S) are returned, as transformers' eager attention returns them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # transformers 5.x output capture (utils/output_capturing.py)
    from transformers.utils.output_capturing import _active_collector as _output_collector
except ImportError:  # transformers 4.x: attention probabilities are not recorded
    _output_collector = None

CONFIG_KEY = "clover"  # config.clover = {"method": ..., "sites": {module path: site spec}}


class HeadLayout:
    """Index bookkeeping of one pruned attention: which packed columns belong to which head, by dims bucket."""

    def __init__(self, num_heads: int, num_kv_heads: int, qk_dims: list[int], vo_dims: list[int]):
        self.group = num_heads // num_kv_heads
        self._indices: dict[str, list[int] | None] = {}
        self._tensors: dict[tuple[str, torch.device], torch.Tensor] = {}
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.qk_dims, self.vo_dims = list(qk_dims), list(vo_dims)
        q_off = self._offsets([qk_dims[h // self.group] for h in range(num_heads)])
        k_off, v_off = self._offsets(qk_dims), self._offsets(vo_dims)
        o_off = self._offsets([vo_dims[h // self.group] for h in range(num_heads)])
        self.q_width, self.k_width, self.v_width = q_off[-1], k_off[-1], v_off[-1]
        self.out_width = o_off[-1]
        buckets: dict[tuple[int, int], list[int]] = {}
        for j in range(num_kv_heads):
            buckets.setdefault((qk_dims[j], vo_dims[j]), []).append(j)
        self.buckets: list[tuple[int, int, int]] = []  # (dq, dv, number of KV groups)
        out_positions, bucket_heads = [], []
        for b, ((dq, dv), groups) in enumerate(buckets.items()):
            heads = [h for j in groups for h in range(j * self.group, (j + 1) * self.group)]
            self._index(f"q{b}", [i for h in heads for i in range(q_off[h], q_off[h] + dq)], self.q_width)
            self._index(f"k{b}", [i for j in groups for i in range(k_off[j], k_off[j] + dq)], self.k_width)
            self._index(f"v{b}", [i for j in groups for i in range(v_off[j], v_off[j] + dv)], self.v_width)
            out_positions += [i for h in heads for i in range(o_off[h], o_off[h] + dv)]
            bucket_heads += heads
            self.buckets.append((dq, dv, len(groups)))
        self._index("out", sorted(range(len(out_positions)), key=out_positions.__getitem__), self.out_width)
        # attention probabilities are computed bucket by bucket; this puts their heads back in the original order
        self._head_order = sorted(range(num_heads), key=bucket_heads.__getitem__)
        # every KV group has the same dims: cache K/V per group, (B, G, T, d), the layout SDPA reads fastest
        self.uniform = len(self.buckets) == 1

    @staticmethod
    def _offsets(widths: list[int]) -> list[int]:
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + w)
        return offsets

    def _index(self, name: str, index: list[int], width: int) -> None:
        # plain lists, turned into tensors on first use per device: modules may be built on the meta device
        identity = index == list(range(width))  # the common uniform case needs no gather at all
        self._indices[name] = None if identity else index

    def take(self, x: torch.Tensor, name: str) -> torch.Tensor:
        index = self._indices[name]
        if index is None:
            return x
        key = (name, x.device)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(index, dtype=torch.long, device=x.device)
        return x.index_select(-1, self._tensors[key])

    def _sdpa(self, q, k, v, mask, causal: bool, scaling: float, dropout: float) -> torch.Tensor:
        """SDPA on (B, heads, L, dq) x (B, groups, S, dq|dv), keeping torch's fast CPU kernels in play."""
        batch, heads, q_len, dq = q.shape
        groups, dv = k.shape[1], v.shape[-1]
        if q_len == 1 and self.group > 1 and (mask is None or mask.shape[-2] == 1):
            # decoding: fold each group's query heads into the query axis, one K/V read per group (~20x on CPU)
            q = q.reshape(batch, groups, self.group, dq)
            if dq != dv and dropout == 0.0:
                # unequal dims send SDPA to its slow math path; with a handful of queries two matmuls are faster
                scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scaling)
                if mask is not None:
                    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                out = torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype), v)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
            return out.reshape(batch, heads, 1, dv)
        width = max(dq, dv)
        if dq != dv:  # unequal Q-K / V-O dims push SDPA onto its slow math path; zero columns change nothing
            q, k = F.pad(q, (0, width - dq)), F.pad(k, (0, width - dq))
            v = F.pad(v, (0, width - dv))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=scaling, enable_gqa=self.group > 1
        )
        return out[..., :dv]

    def cache_entry(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """(B, T, width) projection output -> what the KV cache stores: exactly the kept dims, nothing else."""
        if not self.uniform:
            return x.unsqueeze(1)  # ragged dims: one cache "head" holding every kept dim of the layer
        dq, dv, groups = self.buckets[0]
        return x.view(x.shape[0], x.shape[1], groups, dq if side == "k" else dv).transpose(1, 2)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        scaling: float,
        is_causal: bool,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """query (B, L, q_width) and key / value as ``cache_entry`` lays them out -> (B, L, out_width)."""
        batch, q_len, _ = query.shape
        kv_len = key.shape[2]
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, :kv_len]
        causal = q_len > 1 and attention_mask is None and is_causal
        if causal and kv_len > q_len:
            key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        if self.uniform:
            dq, dv, groups = self.buckets[0]
            if dv == 0:
                return query.new_zeros(batch, q_len, 0)
            heads = groups * self.group
            if dq == 0:
                q, key = query.new_zeros(batch, heads, q_len, 1), key.new_zeros(batch, groups, kv_len, 1)
            else:
                q = query.view(batch, q_len, heads, dq).transpose(1, 2)
            out = self._sdpa(q, key, value, attention_mask, causal, scaling, dropout)
            return out.transpose(1, 2).reshape(batch, q_len, heads * dv)
        key, value = key[:, 0], value[:, 0]
        outputs = []
        for b, (dq, dv, groups) in enumerate(self.buckets):
            heads = groups * self.group
            if dv == 0:  # every V-O dim of these heads pruned: they add nothing
                continue
            if dq == 0:  # every Q-K dim pruned: scores are all zero, attention is uniform over unmasked keys
                q = query.new_zeros(batch, heads, q_len, 1)
                k = key.new_zeros(batch, groups, kv_len, 1)
            else:
                q = self.take(query, f"q{b}").view(batch, q_len, heads, dq).transpose(1, 2)
                k = self.take(key, f"k{b}").view(batch, kv_len, groups, dq).transpose(1, 2)
            v = self.take(value, f"v{b}").view(batch, kv_len, groups, dv).transpose(1, 2)
            out = self._sdpa(q, k, v, attention_mask, causal, scaling, dropout)
            outputs.append(out.transpose(1, 2).reshape(batch, q_len, heads * dv))
        if not outputs:
            return query.new_zeros(batch, q_len, 0)
        return self.take(torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0], "out")

    def attend_eager(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        scaling: float,
        is_causal: bool,
        dropout: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``attend`` written out as transformers' eager attention: softmax(q kᵀ · scale + mask) per head, each
        with its own dims. Returns the output and the probabilities (B, num_heads, L, S), heads in the original
        order (for ``output_attentions``; slower than ``attend``)."""
        batch, q_len, _ = query.shape
        kv_len = key.shape[2]
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, :kv_len]
        causal = q_len > 1 and attention_mask is None and is_causal
        if causal and kv_len > q_len:  # as in ``attend``: an unfilled static cache beyond the prompt
            key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
        if causal:
            attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        if not self.uniform:
            key, value = key[:, 0], value[:, 0]
        outputs, probabilities = [], []
        for b, (dq, dv, groups) in enumerate(self.buckets):
            heads = groups * self.group
            # a dims count of 0 gives empty matmuls: zero scores (uniform attention) or a zero-width output
            q = self.take(query, f"q{b}").reshape(batch, q_len, heads, dq).transpose(1, 2)
            if self.uniform:
                k, v = key, value
            else:
                k = self.take(key, f"k{b}").reshape(batch, kv_len, groups, dq).transpose(1, 2)
                v = self.take(value, f"v{b}").reshape(batch, kv_len, groups, dv).transpose(1, 2)
            k, v = k.repeat_interleave(self.group, dim=1), v.repeat_interleave(self.group, dim=1)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
            if attention_mask is not None:
                if attention_mask.dtype == torch.bool:  # the finite minimum, like the eager masks: no NaN rows
                    scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
                else:
                    scores = scores + attention_mask
            weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            if dropout > 0.0:
                weights = F.dropout(weights, p=dropout, training=True)
            probabilities.append(weights)
            outputs.append(torch.matmul(weights, v).transpose(1, 2).reshape(batch, q_len, heads * dv))
        out = self.take(torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0], "out")
        weights = torch.cat(probabilities, dim=1) if len(probabilities) > 1 else probabilities[0]
        if self._head_order != list(range(self.num_heads)):
            weights = weights[:, self._head_order]
        return out, weights


def _recorded(key: str) -> list | None:
    """Where transformers collects ``key`` ("attentions" / "cross_attentions") during this forward pass, or None
    when nobody asked (``output_attentions`` unset). Its output-capture hooks attach only to its own attention
    classes, so the pruned ones add their probabilities themselves."""
    if _output_collector is None:
        return None
    collected = _output_collector.get()
    return collected.get(key) if collected else None


def _linear(spec: dict, name: str, d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=spec["bias"][name])


class _PrunedAttentionBase(nn.Module):
    """Packed q/k/v/o projections and the head layout, built from a site spec (see ``site_spec`` in clover.prune)."""

    def __init__(self, spec: dict, layer_idx: int | None, *, o_name: str = "o_proj", with_o: bool = True):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.scaling = float(spec["scaling"])
        self.is_causal = bool(spec["is_causal"])
        self.dropout_p = float(spec.get("dropout", 0.0))  # attention probabilities, training only
        self.output_dropout = float(spec.get("output_dropout", 0.0))
        self.layout = HeadLayout(spec["num_heads"], spec["num_kv_heads"], spec["qk_dims"], spec["vo_dims"])
        d_q, d_kv, d_out = spec["d_q"], spec["d_kv"], spec["d_out"]
        self.q_proj = _linear(spec, "q", d_q, self.layout.q_width)
        self.k_proj = _linear(spec, "k", d_kv, self.layout.k_width)
        self.v_proj = _linear(spec, "v", d_kv, self.layout.v_width)
        if with_o:
            setattr(self, o_name, _linear(spec, "o", self.layout.out_width, d_out))

    def _attend(self, query, key, value, attention_mask, scaling=None, record: str = "attentions"):
        """(output, attention probabilities or None); the probabilities only when the caller asked for them."""
        options = {
            "scaling": self.scaling if scaling is None else scaling,
            "is_causal": self.is_causal,
            "dropout": self.dropout_p if self.training else 0.0,
        }
        recorder = _recorded(record)
        if recorder is None:
            return self.layout.attend(query, key, value, attention_mask, **options), None
        out, weights = self.layout.attend_eager(query, key, value, attention_mask, **options)
        recorder.append(weights)
        return out, weights


class CloverLlamaAttention(_PrunedAttentionBase):
    """Llama / Qwen2 / Mistral self-attention with pruned V-O dims (Q-K intact: RoPE acts between Q and K)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        batch, length, _ = hidden_states.shape
        head_dim = self.spec["head_dim"]
        q = self.q_proj(hidden_states).view(batch, length, -1, head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q = q.transpose(1, 2).reshape(batch, length, -1)
        k = self.layout.cache_entry(k.transpose(1, 2).reshape(batch, length, -1), "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self._attend(q, k, v, attention_mask)
        return self.o_proj(out), weights


class CloverWhisperAttention(_PrunedAttentionBase):
    """Whisper encoder self-, decoder self- and decoder cross-attention with pruned Q-K and V-O dims."""

    def __init__(self, spec: dict, layer_idx: int | None):
        super().__init__(spec, layer_idx, o_name="out_proj")

    def forward(self, hidden_states, key_value_states=None, cache=None, attention_mask=None, **kwargs):
        from transformers.cache_utils import EncoderDecoderCache

        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("output_attentions", None)
        is_cross = key_value_states is not None
        record = "cross_attentions" if is_cross else "attentions"  # WhisperDecoder's names for them
        # Whisper scales q before the product (as the original does) and attends with scale 1
        query = self.q_proj(hidden_states) * self.scaling
        is_updated = False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            if is_cross:
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache
        source = key_value_states if is_cross else hidden_states
        if is_cross and cache is not None and is_updated:
            k, v = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            k, v = self.layout.cache_entry(self.k_proj(source), "k"), self.layout.cache_entry(self.v_proj(source), "v")
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self._attend(query, k, v, attention_mask, scaling=1.0, record=record)
        return self.out_proj(out), weights


class CloverBertSelfAttention(_PrunedAttentionBase):
    """BERT self-attention with pruned Q-K and V-O dims; its output projection lives in BertSelfOutput.dense."""

    def __init__(self, spec: dict, layer_idx: int | None):
        super().__init__(spec, layer_idx, with_o=False)

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        q = self.q_proj(hidden_states)
        k = self.layout.cache_entry(self.k_proj(hidden_states), "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        return self._attend(q, k, v, attention_mask)


class CloverGPT2Attention(_PrunedAttentionBase):
    """GPT-2 self-attention with pruned Q-K and V-O dims; the fused c_attn becomes separate packed q/k/v."""

    def __init__(self, spec: dict, layer_idx: int | None):
        super().__init__(spec, layer_idx, o_name="c_proj")

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        q = self.q_proj(hidden_states)
        k = self.layout.cache_entry(self.k_proj(hidden_states), "k")
        v = self.layout.cache_entry(self.v_proj(hidden_states), "v")
        if cache is not None:
            from transformers.cache_utils import EncoderDecoderCache

            target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            k, v = target.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self._attend(q, k, v, attention_mask)
        return F.dropout(self.c_proj(out), self.output_dropout, self.training), weights


PRUNED_ATTENTION = {
    "llama": CloverLlamaAttention,
    "whisper": CloverWhisperAttention,
    "bert": CloverBertSelfAttention,
    "gpt2": CloverGPT2Attention,
}


def install_pruned_attention(model: nn.Module, sites: dict[str, dict]) -> None:
    """Replace each listed attention module (by module path) with its pruned counterpart (weights uninitialised)."""
    for name, spec in sites.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = getattr(parent, child)
        pruned = PRUNED_ATTENTION[spec["family"]](spec, spec.get("layer_idx")).train(original.training)
        if spec["family"] == "bert":  # BertAttention keeps its LayerNorm/dropout; swap .self and .output.dense
            original.self = pruned
            dense = original.output.dense
            original.output.dense = nn.Linear(
                pruned.layout.out_width, dense.out_features, bias=dense.bias is not None
            ).train(dense.training)
        else:
            setattr(parent, child, pruned)


def _pruned_class(base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        install_pruned_attention(self, getattr(config, CONFIG_KEY)["sites"])

    return type(f"Clover{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


def _define_classes() -> None:
    import transformers

    for base_name in (
        "LlamaForCausalLM",
        "Qwen2ForCausalLM",
        "MistralForCausalLM",
        "LlamaModel",
        "GPT2LMHeadModel",
        "GPT2Model",
        "BertModel",
        "WhisperForConditionalGeneration",
    ):
        globals()[f"Clover{base_name}"] = _pruned_class(getattr(transformers, base_name))
        _register_task_names(f"Clover{base_name}", base_name)


def _register_task_names(name: str, base_name: str) -> None:
    """List a pruned class beside its base in the auto-class name tables that check a model by class *name*.

    transformers' text-generation pipeline (``Pipeline.check_model_type``) logs an error listing every causal LM
    for a class name that MODEL_FOR_CAUSAL_LM_MAPPING_NAMES lacks, and Trainer shifts causal-LM labels for label
    smoothing only for names listed there. The key is no model_type, so the lazy auto mappings, which join these
    tables with the config table by model_type, never see it."""
    from transformers.models.auto import modeling_auto

    for table in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"):
        names = getattr(modeling_auto, table, None)
        if names is not None and base_name in names.values():
            names.setdefault(f"clover:{name}", name)


_define_classes()
