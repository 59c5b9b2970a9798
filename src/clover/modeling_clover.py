"""Attention with pruned, per-head Q-K and V-O dims (CLOVER), for transformers models.

Self-contained on purpose: it imports only torch and transformers, because a pruned checkpoint carries this file,
followed by the pruned attention classes it uses (each family's, copied from its file in ``clover.families``) and
the one model class it needs (``define_model_classes``), so ``from_pretrained(DIR, trust_remote_code=True)`` loads
it without clover, with any transformers that has the model's own family.

Each pruned attention keeps, for every KV group j, ``qk_dims[j]`` Q-K dims (in K and in each of the group's
query heads) and ``vo_dims[j]`` V-O dims (in V and in each query head's rows of O). Projections are packed:
head blocks of their own widths, concatenated. The KV cache holds exactly the kept dims: (B, G, T, d) per
KV group when every group keeps the same dims, else one cache "head" of width sum(qk_dims) for K, sum(vo_dims)
for V. Under partial RoPE (``rotary_dims``) each Q-K head block is [its rotary dims, unpruned | its kept
pass-through dims]; the family's forward rotates the first part. Heads with equal dims are computed together by
torch's scaled_dot_product_attention; the softmax scale is the original model's, never recomputed from pruned dims.
When the caller asks for ``output_attentions``, attention is computed explicitly instead and the per-head
probabilities (B, num_heads, L, S) are returned, as transformers' eager attention returns them.
"""

from __future__ import annotations

import warnings

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

    def __init__(self, num_heads: int, num_kv_heads: int, qk_dims: list[int], vo_dims: list[int], rotary_dims: int = 0):
        self.group = num_heads // num_kv_heads
        self.rotary_dims = rotary_dims  # partial RoPE: each Q-K head block starts with this many rotary dims
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
        for side, offsets, heads in (("q", q_off, num_heads), ("k", k_off, num_kv_heads)):
            # ragged heads: gather every head's rotary dims into one (heads, rotary_dims) block and back
            rot = [i for h in range(heads) for i in range(offsets[h], offsets[h] + rotary_dims)]
            rest = [i for h in range(heads) for i in range(offsets[h] + rotary_dims, offsets[h + 1])]
            self._index(f"{side}_rot", rot, offsets[-1])
            self._index(f"{side}_pass", rest, offsets[-1])
            self._index(f"{side}_join", sorted(range(offsets[-1]), key=(rot + rest).__getitem__), offsets[-1])

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

    def split_rotary(self, x: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (B, L, width) queries ("q") or keys ("k") -> their rotary dims (B, L, heads, rotary_dims), and
        the other dims in a layout that only ``join_rotary`` reads."""
        heads = self.num_heads if side == "q" else self.num_kv_heads
        if self.uniform:  # equal head blocks: a view, no gather
            blocks = x.unflatten(-1, (heads, -1))
            return blocks[..., : self.rotary_dims], blocks[..., self.rotary_dims :]
        return self.take(x, f"{side}_rot").unflatten(-1, (heads, self.rotary_dims)), self.take(x, f"{side}_pass")

    def join_rotary(self, rotary: torch.Tensor, rest: torch.Tensor, side: str) -> torch.Tensor:
        """Inverse of ``split_rotary``, once the rotary dims are rotated: packed (B, L, width) again."""
        if self.uniform:
            return torch.cat([rotary, rest], dim=-1).flatten(-2)
        return self.take(torch.cat([rotary.flatten(-2), rest], dim=-1), f"{side}_join")

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


FORMAT_VERSION = 2  # config.clover["format"]: the site spec below; format 1 (no "format" key) named a family


def zero_width_safe_linear(d_in: int, d_out: int, **kwargs) -> nn.Linear:
    """``nn.Linear`` that may have no rows or columns: a head pruned to 0 dims is a valid layout, and torch's
    "Initializing zero-element tensors is a no-op" warning would only leak onto the user's terminal."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(d_in, d_out, **kwargs)


def _linear(spec: dict, name: str, d_in: int, d_out: int) -> nn.Linear:
    return zero_width_safe_linear(d_in, d_out, bias=spec["bias"][name])


# class name -> what computes a pruned site, with ``pruned_from(original, spec)``: a PrunedAttention subclass
# (each family file adds its own), or a class that prunes the original module in place (a diffusers processor)
PRUNED_ATTENTION: dict[str, type] = {}


class PrunedAttention(nn.Module):
    """Packed q/k/v(/o) projections and the head layout, built from a site spec (``clover.prune.site_spec``).

    A family's pruned attention subclasses this and writes only its ``forward`` (where Q, K, V come from, its
    positional scheme, its cache); subclasses register themselves by class name, the key a checkpoint's spec
    names in ``attention_class``. Subclasses are copied into pruned checkpoints by source: they may use only
    torch, ``F``, ``nn``, the names of this file, and transformers imported inside their methods.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PRUNED_ATTENTION[cls.__name__] = cls

    def __init__(self, spec: dict, layer_idx: int | None):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.scaling = float(spec["scaling"])
        self.is_causal = bool(spec["is_causal"])
        self.dropout_p = float(spec.get("dropout", 0.0))  # attention probabilities, training only
        self.output_dropout = float(spec.get("output_dropout", 0.0))
        self.head_dim = spec["head_dim"]
        self.layout = HeadLayout(
            spec["num_heads"], spec["num_kv_heads"], spec["qk_dims"], spec["vo_dims"], spec.get("rotary_dims", 0)
        )
        d_q, d_kv, d_out = spec["d_q"], spec["d_kv"], spec["d_out"]
        self.q_proj = _linear(spec, "q", d_q, self.layout.q_width)
        self.k_proj = _linear(spec, "k", d_kv, self.layout.k_width)
        self.v_proj = _linear(spec, "v", d_kv, self.layout.v_width)
        if "." not in spec["output"]:  # the output projection lives inside the attention module
            setattr(self, spec["output"], _linear(spec, "o", self.layout.out_width, d_out))

    @classmethod
    def pruned_from(cls, original: nn.Module, spec: dict) -> nn.Module:
        """The module that takes ``original``'s place (weights uninitialised), with its ``kept`` submodules."""
        pruned = cls(spec, spec.get("layer_idx")).train(original.training)
        for name in spec.get("kept", ()):
            setattr(pruned, name, getattr(original, name))
        return pruned

    @property
    def out_projection(self) -> nn.Linear | None:
        return getattr(self, self.spec["output"], None) if "." not in self.spec["output"] else None

    def _attend(self, query, key, value, attention_mask, scaling=None, record: str = "attentions", layout=None):
        """(output, attention probabilities or None); the probabilities only when the caller asked for them.
        ``layout``: the heads' layout of the scores where it is not ``self.layout`` (MLA's rope dims)."""
        layout = self.layout if layout is None else layout
        options = {
            "scaling": self.scaling if scaling is None else scaling,
            "is_causal": self.is_causal,
            "dropout": self.dropout_p if self.training else 0.0,
        }
        recorder = _recorded(record)
        if recorder is None:
            return layout.attend(query, key, value, attention_mask, **options), None
        out, weights = layout.attend_eager(query, key, value, attention_mask, **options)
        recorder.append(weights)
        return out, weights


def install_pruned_attention(model: nn.Module, sites: dict[str, dict]) -> None:
    """Replace each listed attention (by module path) with its pruned counterpart (weights uninitialised).

    A spec says which submodule of the site the pruned attention replaces (``replace``, "" for the site itself),
    where the output projection lives (``output``, relative to the site: inside the pruned module, or outside
    it like BERT's ``output.dense``, which is then resized), and which submodules it keeps as they are (``kept``:
    QK-norms), taken over from the module it replaces. The class a spec names may instead prune the original
    module in place and return it (``pruned_from``: a diffusers Attention keeps its place with our processor).
    """
    prefix = getattr(model, "base_model_prefix", "")
    for path, spec in sites.items():
        if prefix and not hasattr(model, prefix) and path.startswith(f"{prefix}."):
            path = path.removeprefix(f"{prefix}.")  # the bare model (AutoModel) read from a checkpoint with a head
        if spec.get("attention_class") not in PRUNED_ATTENTION:
            raise ValueError(
                f"{path}: this checkpoint's pruned attention {spec.get('attention_class') or spec.get('family')!r} "
                f"is not defined here (format {FORMAT_VERSION}); load it with the clover version that wrote it"
            )
        replaced_path = ".".join(p for p in (path, spec.get("replace", "")) if p)
        original = model.get_submodule(replaced_path)
        pruned = PRUNED_ATTENTION[spec["attention_class"]].pruned_from(original, spec)
        if pruned is not original:
            model.set_submodule(replaced_path, pruned)
        site = model.get_submodule(path)
        if "." in spec["output"]:  # an output projection outside the replaced module keeps its place, resized
            dense = site.get_submodule(spec["output"])
            out_width = spec["num_heads"] // spec["num_kv_heads"] * sum(spec["vo_dims"])  # every query head's V-O dims
            resized = zero_width_safe_linear(out_width, dense.out_features, bias=dense.bias is not None)
            site.set_submodule(spec["output"], resized.train(dense.training))


def _pruned_class(base: type) -> type:
    def __init__(self, config, *args, **kwargs):
        sites = (getattr(config, CONFIG_KEY, None) or {}).get("sites")
        if sites is None:  # an auto class can keep a remote class registered for a config class it lacks a model for
            raise ValueError(
                f"Clover{base.__name__} builds pruned clover checkpoints, and this config describes no pruned "
                f"attention (no {CONFIG_KEY}.sites): load this model with transformers' {base.__name__}"
            )
        base.__init__(self, config, *args, **kwargs)
        install_pruned_attention(self, sites)

    return type(f"Clover{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


def define_model_classes(base_names: list[str]) -> None:
    """Define ``Clover<base>`` for each transformers model class name: the base that installs pruned attention."""
    import transformers

    for base_name in base_names:
        globals()[f"Clover{base_name}"] = _pruned_class(getattr(transformers, base_name))
        _register_task_names(f"Clover{base_name}", base_name)
        _inherit_key_renames(f"Clover{base_name}", base_name)


def _inherit_key_renames(name: str, base_name: str) -> None:
    """Give a pruned class its base class's checkpoint key renames (GPT-NeoX saves ``lm_head`` as ``embed_out``).

    transformers 5 renames keys by class name on save and load, but skips classes from remote code unless their
    name is registered, so without this a pruned checkpoint would load with a freshly initialised head."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4.x renames nothing by class
        return
    renames = get_checkpoint_conversion_mapping(base_name)
    if renames is not None:
        register_checkpoint_conversion_mapping(name, renames, overwrite=True)
        return
    # renames listed by model_type (Mllama saves ``lm_head`` as ``language_model.lm_head``) reach a remote class only
    # once its model_type counts as registered by the user: register the very same renames again
    import transformers

    model_type = getattr(getattr(getattr(transformers, base_name), "config_class", None), "model_type", None)
    renames = get_checkpoint_conversion_mapping(model_type) if model_type else None
    if renames is not None:
        register_checkpoint_conversion_mapping(model_type, renames, overwrite=True)


def _register_task_names(name: str, base_name: str) -> None:
    """List a pruned class beside its base in the auto-class name tables that check a model by class *name*.

    transformers' text-generation pipeline (``Pipeline.check_model_type``) logs an error listing every causal LM
    for a class name that MODEL_FOR_CAUSAL_LM_MAPPING_NAMES lacks, and Trainer shifts causal-LM labels for label
    smoothing only for names listed there. The key is no model_type, so the lazy auto mappings, which join these
    tables with the config table by model_type, never see it."""
    from transformers.models.auto import modeling_auto

    for table in (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
        "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
        "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",  # the image-text-to-text pipeline checks it the same way
    ):
        names = getattr(modeling_auto, table, None)
        if names is not None and base_name in names.values():
            names.setdefault(f"clover:{name}", name)
