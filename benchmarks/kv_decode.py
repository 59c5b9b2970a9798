"""Real savings of pruning: KV-cache bytes per token (read from the cache object) and greedy decode speed,
pruned vs unpruned, measured in the same run.

    .venv/bin/python benchmarks/kv_decode.py [--context 2048] [--batch 4] [--new-tokens 32]

SmolLM2-135M: 50% of V-O dims removed (RoPE forbids Q-K pruning, so K stays whole: the cache shrinks 25%).
Whisper-base: 50% of Q-K and V-O dims removed in the decoder's self- and cross-attention (uniform), so the
decoder self-attention cache and the cross-attention cache (1500 encoder frames) both shrink by half.
Decode tokens/s excludes prefill: (t(N tokens) - t(1 token)) over N-1 tokens, medians of repeats.
"""

from __future__ import annotations

import argparse

import torch
from common import header, write_csv

from clover import evaluate
from clover.models import load_model, model_cache_dir
from clover.prune import PruneConfig, prune_


def smollm2(context: int, batch: int, new_tokens: int, repeats: int) -> list[dict]:
    rows = []
    tokenizer = load_model("smollm2-135m").tokenizer
    ids = tokenizer(evaluate.wikitext2_text("test"), return_tensors="pt").input_ids[0]
    prompts = torch.stack([ids[i * context : (i + 1) * context] for i in range(batch)])
    for label, options in (("unpruned", None), ("vo 50% pruned", PruneConfig(vo_ratio=0.5))):
        loaded = load_model("smollm2-135m")
        if options is not None:
            prune_(loaded.model, options)
        kv = evaluate.kv_cache_bytes_per_token(loaded.model, tokenizer)
        timing = evaluate.decode_timing(loaded.model, prompts, new_tokens=new_tokens, repeats=repeats)
        rows.append({"model": "smollm2-135m", "variant": label, "context": context, "batch": batch,
                     "kv_bytes_per_token": kv, "cross_kv_bytes_per_frame": "",
                     "parameters": sum(p.numel() for p in loaded.model.parameters()),
                     "prefill_s": round(timing.prefill_seconds, 3),
                     "decode_tokens_per_s": round(timing.decode_tokens_per_second, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def whisper(batch: int, new_tokens: int, repeats: int) -> list[dict]:
    rows = []
    base = load_model("whisper-base")
    audios = evaluate.synthesize_speech(evaluate.harvard_sentences(batch), model_cache_dir() / "speech")
    features = base.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
    prompt = torch.tensor([base.decoder_prompt_ids] * batch)
    options = PruneConfig(qk_ratio=0.5, vo_ratio=0.5, stacks=("decoder", "cross"))
    for label, config in (("unpruned", None), ("decoder qk+vo 50% pruned", options)):
        loaded = load_model("whisper-base")
        if config is not None:
            prune_(loaded.model, config)
        cache = evaluate.encoder_decoder_cache_bytes(loaded.model)
        # no EOS stop: every run decodes exactly new_tokens tokens, whatever the transcript
        timing = evaluate.decode_timing(loaded.model, features, new_tokens=new_tokens, repeats=repeats,
                                        decoder_input_ids=prompt, eos_token_id=None, suppress_tokens=None,
                                        begin_suppress_tokens=None)  # fmt: skip
        rows.append({"model": "whisper-base", "variant": label, "context": 1500, "batch": batch,
                     "kv_bytes_per_token": cache.self_attention_per_token,
                     "cross_kv_bytes_per_frame": cache.cross_attention_per_frame,
                     "parameters": sum(p.numel() for p in loaded.model.parameters()),
                     "prefill_s": round(timing.prefill_seconds, 3),
                     "decode_tokens_per_s": round(timing.decode_tokens_per_second, 2)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=2048, help="SmolLM2 prompt tokens per sequence")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    header("KV cache and decode speed, pruned vs unpruned")
    rows = smollm2(args.context, args.batch, args.new_tokens, args.repeats)
    rows += whisper(args.batch, args.new_tokens, args.repeats)
    write_csv("kv_decode.csv", rows)
    print("\n| model | variant | KV bytes/token | cross KV bytes/frame | decode tok/s | ratio vs unpruned |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["model"] == row["model"] and r["variant"] == "unpruned")
        ratio = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(f"| {row['model']} | {row['variant']} | {row['kv_bytes_per_token']:.0f} "
              f"| {row['cross_kv_bytes_per_frame']} | {row['decode_tokens_per_s']} | {ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
