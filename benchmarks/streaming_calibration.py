"""Calibration of a model larger than memory, at Llama-2-7B width: layer by layer against module by module.

A synthetic bf16 checkpoint of random weights shaped like Llama-2-7B (32 layers x 4096, MHA, FFN 11008), with
SmolLM2's vocabulary (49152) so that SmolLM2's tokenizer turns WikiText-2 into its token ids, written shard by
shard and deleted afterwards. In the same run, each in a child process with its peak resident memory from the OS:

- ``module by module``: accelerate's disk offload, each module's weights read just before its forward, for
  every batch of 8 sequences; the moments of every layer held in memory (d x d float64 per layer: 4.3 GB);
- ``layer by layer`` (what ``clover prune --stream`` does): every batch through one layer before the next is
  read, each layer's moments written to disk as it finishes;
- the whole ``clover prune --stream --method calibrated --vo-ratio 0.25`` (calibration, scoring, rewrite).

The two ways' moments are compared entry by entry (largest difference relative to the entry's largest value).

    .venv/bin/python benchmarks/streaming_calibration.py [--samples 16] [--length 32] [--workdir DIR]

Writes benchmarks/results/streaming_calibration.csv. Needs about 30 GB of free disk (checkpoint, output, moments).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile

import transformers as tf
from common import header, write_csv
from streaming_7b import SHAPES, drop_page_cache, measured

from clover.models import cached_model_path
from clover.prune import InputMoments
from clover.streaming import write_random_checkpoint

CALIBRATION = """
import pathlib, sys, time
from clover.models import LoadedModel, _load_tokenizer
from clover.prune import InputMoments
from clover.quality import calibration_callback
from clover.streaming import StreamedModel, layerwise_moments, streamed_calibration_model
source, tokenizer_dir, way, samples, length, out = sys.argv[1:]
skeleton = StreamedModel(source).model
tokenizer, _ = _load_tokenizer(pathlib.Path(tokenizer_dir), "causal-lm", skeleton.config, {})
loaded = LoadedModel(skeleton, tokenizer, source, "causal-lm", source=pathlib.Path(source))
callback = calibration_callback(loaded, samples=int(samples), seq_len=int(length))
start = time.perf_counter()
if way == "layer":
    written = layerwise_moments(source, callback, pathlib.Path(out).parent)
    written.rename(out)
else:
    moments = InputMoments.collect(streamed_calibration_model(source), callback)
    seconds = time.perf_counter() - start
    moments.save(out)  # for the comparison, after the timing
    print("SECONDS", seconds)
    sys.exit(0)
print("SECONDS", time.perf_counter() - start)
"""


def largest_difference(first: pathlib.Path, second: pathlib.Path) -> float:
    """max over entries of max|a - b| / max|a|, reading one entry at a time."""
    a, b = InputMoments.load(first, lazy=True), InputMoments.load(second, lazy=True)
    worst = 0.0
    assert a.stats.keys() == b.stats.keys()
    for name in a.stats:
        gram_a, _, count_a = a.stats[name]
        gram_b, _, count_b = b.stats[name]
        assert count_a == count_b, name
        worst = max(worst, float((gram_a - gram_b).abs().max() / gram_a.abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences (batches of 8)")
    parser.add_argument("--length", type=int, default=32, help="tokens per calibration sequence")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (fewer for a quick try)")
    parser.add_argument("--workdir", help="where the synthetic checkpoint goes (default: a temporary folder)")
    args = parser.parse_args()
    header("Calibration of a Llama-2-7B-shaped checkpoint: layer by layer against module by module")
    tokenizer = cached_model_path("smollm2-135m")
    if not (tokenizer / "tokenizer.json").is_file():
        sys.exit(f"run `clover eval smollm2-135m` once first: its tokenizer is read from {tokenizer}")
    shape = {**SHAPES["llama2-7b"], "vocab_size": 49152, "num_hidden_layers": args.layers}
    work = pathlib.Path(tempfile.mkdtemp(prefix="clover-calibration-", dir=args.workdir))
    rows = []
    try:
        config = tf.LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=4096)
        size = write_random_checkpoint(config, work / "model", shard_bytes=2 * 2**30)
        common = {"layers": args.layers, "checkpoint_gib": round(size / 2**30, 2), "samples": args.samples,
                  "length": args.length}  # fmt: skip
        script = work / "calibrate.py"
        script.write_text(CALIBRATION)
        files = {}
        for way in ("module", "layer"):
            (work / way).mkdir()
            files[way] = work / way / "moments.safetensors"
            cold = drop_page_cache()
            wall, peak, stdout = measured([sys.executable, str(script), str(work / "model"), str(tokenizer), way,
                                           str(args.samples), str(args.length), str(files[way])])  # fmt: skip
            seconds = float([line for line in stdout.splitlines() if line.startswith("SECONDS")][-1].split()[1])
            rows.append({"run": f"calibration, {way} by {way}", "wall_s": round(wall, 1),
                         "calibration_s": round(seconds, 1), "peak_rss_gib": round(peak / 2**30, 2),
                         "cold_reads": cold, **common})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        difference = largest_difference(files["module"], files["layer"])
        for way in files:
            shutil.rmtree(work / way)
        cold = drop_page_cache()
        command = [sys.executable, "-m", "clover.cli", "prune", str(work / "model"), "--stream", "--method",
                   "calibrated", "--vo-ratio", "0.25", "--tokenizer", str(tokenizer), "--calibration-samples",
                   str(args.samples), "--calibration-length", str(args.length), "--recalibrate", "--quiet", "--json",
                   "--out", str(work / "pruned")]  # fmt: skip
        os.environ["CLOVER_CACHE"] = str(work / "cache")  # the 4 GB of moments go with the checkpoint
        wall, peak, _ = measured(command)
        rows.append({"run": "clover prune --stream --method calibrated --vo-ratio 0.25", "wall_s": round(wall, 1),
                     "calibration_s": "", "peak_rss_gib": round(peak / 2**30, 2), "cold_reads": cold,
                     **common})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        for row in rows:
            row["moments_max_rel_difference"] = f"{difference:.1e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {write_csv('streaming_calibration.csv', rows)}")


if __name__ == "__main__":
    main()
