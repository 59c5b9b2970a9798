"""Streaming at 7B width: decompose and V-O-prune checkpoints larger than this machine's memory budget, one layer
at a time, with peak resident memory from the OS, against one plain read and one write of the same bytes.

Synthetic bf16 checkpoints of random weights, written shard by shard (never held in memory), shaped like
Llama-2-7B (32 layers x 4096, MHA 32 heads, FFN 11008, vocab 32000) and Llama-3-8B (GQA 32/8, FFN 14336,
vocab 128256); each is deleted after its runs. In the same run: the time of ``cat`` of the shards to /dev/null
(one read), of writing the same number of bytes (one write), of the factorization alone (one layer's Q-K and V-O
in float64, times the layer count) and this machine's float64 matmul throughput, against which the
factorization's flops are stated as a share: 8·m·d_h² per factor of m rows (CholeskyQR2's two Gram matrices
and two products with a small triangular factor), so 16·d·d_h² per MHA head and pair, and with GQA 8·d·d_h² per
query head plus 8·d·d_h² per shared K or V head (the group's query heads are stacked into one factor). Where the
OS lets it (root on Linux), the page cache is dropped before the read probe and before each run, so both read
from the disk.

    .venv/bin/python benchmarks/streaming_7b.py [--shapes llama2-7b,llama3-8b] [--workdir DIR]

Writes benchmarks/results/streaming_7b.csv. Needs about 2.2x the checkpoint size of free disk (16 GB model,
16 GB output for Llama-3-8B).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import transformers as tf

from clover.factorize import factorize_qk, factorize_vo
from clover.streaming import OutputFile, write_random_checkpoint

SHAPES = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
}  # fmt: skip
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# runs a command and reports its peak resident memory (the OS's maxrss of the child, in bytes)
PEAK_WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); "
    "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, time.perf_counter() - t, "
    "r.returncode)"
)


def measured(command: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak resident bytes, stdout) of ``command`` run in a child process."""
    result = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *command], capture_output=True, text=True)
    peak_line = [line for line in result.stdout.splitlines() if line.startswith("PEAK")][-1]
    _, peak, seconds, code = peak_line.split()
    if int(code) != 0:
        raise RuntimeError(f"{command} failed: {result.stderr[-2000:]}")
    return float(seconds), int(peak), result.stdout


def shard_files(directory: pathlib.Path) -> list[pathlib.Path]:
    return sorted(directory.glob("*.safetensors"))


def drop_page_cache() -> bool:
    """Empty the OS's page cache (root on Linux) so that reads come from the disk; False where not allowed."""
    try:
        os.sync()
        pathlib.Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def read_seconds(directory: pathlib.Path) -> float:
    drop_page_cache()
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, shard_files(directory))], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def write_seconds(directory: pathlib.Path, total: int, *, direct: bool) -> float:
    """Write ``total`` bytes in 256 MB blocks to the disk: through the page cache (``direct`` False: plain writes,
    then fsync) or past it, as clover's shard writer does where the filesystem allows (O_DIRECT, aligned blocks)."""
    block = torch.frombuffer(bytearray(os.urandom(1 << 20) * 256), dtype=torch.uint8)
    path = directory / "write-probe.bin"
    start = time.perf_counter()
    if direct:
        with OutputFile(path) as f:
            for begin in range(0, total, block.numel()):
                f.write(block[: min(total - begin, block.numel())])
    else:
        with open(path, "wb") as f:
            for begin in range(0, total, block.numel()):
                f.write(memoryview(block[: min(total - begin, block.numel())].numpy()))
            os.fsync(f.fileno())  # on the disk, as the direct writes are: not left to dirty the next measurement
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def factorization_seconds(shape: dict) -> tuple[float, float]:
    """(seconds to factorize one layer's Q-K and V-O in float64, the flops of that)."""
    d, heads, groups = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = d // heads
    generator = torch.Generator().manual_seed(0)

    def weight(cols: int) -> torch.Tensor:
        return torch.randn(d, cols, generator=generator, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)

    w_q, w_k, w_v, w_o = weight(heads * head_dim), weight(groups * head_dim), weight(groups * head_dim), weight(d).T
    groups_args = {"num_heads": heads, "num_kv_heads": groups, "compute_dtype": torch.float64}
    start = time.perf_counter()
    factorize_qk(w_q, w_k, None, None, **groups_args)
    factorize_vo(w_v, w_o.contiguous(), None, None, **groups_args)
    seconds = time.perf_counter() - start
    return seconds, factorization_flops(shape)


def factorization_flops(shape: dict) -> int:
    """One layer's Q-K and V-O factorization: 8·m·d_h² per factor of m rows, the query (output) side one factor of
    group × d rows per KV group, the key (value) side one of d rows."""
    d, heads, groups = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = d // heads
    return 2 * 8 * d * head_dim**2 * (heads + groups)


def matmul_gflops() -> float:
    a, b = torch.randn(4096, 4096, dtype=torch.float64), torch.randn(4096, 4096, dtype=torch.float64)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 3 * 2 * 4096**3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--workdir", help="where the synthetic checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS / "streaming_7b.csv"))
    args = parser.parse_args()
    gflops = matmul_gflops()
    rows = []
    clover = [sys.executable, "-m", "clover.cli"]
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"clover-{name}-", dir=args.workdir))
        try:
            start = time.perf_counter()
            config = tf.LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=4096)
            size = write_random_checkpoint(config, work / "model", shard_bytes=2 * 2**30)
            print(f"{name}: wrote {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)
            layer_s, layer_flops = factorization_seconds(shape)
            factorize_s = layer_s * shape["num_hidden_layers"]
            read_s = read_seconds(work / "model")
            # the budget takes the faster of the two ways to write the bytes, so clover's own way is no excuse
            buffered_write_s = write_seconds(work, size, direct=False)
            direct_write_s = write_seconds(work, size, direct=True)
            write_s = min(buffered_write_s, direct_write_s)
            for action, extra in (("decompose", []), ("prune --vo-ratio 0.25", ["--vo-ratio", "0.25"])):
                verb = action.split()[0]
                out = work / verb
                command = [*clover, verb, str(work / "model"), "--out", str(out), "--stream", "--quiet", "--json",
                           *extra]  # fmt: skip
                cold = drop_page_cache()  # as the read probe: the checkpoint comes from the disk, not the cache
                seconds, peak, stdout = measured(command)
                report = json.loads(stdout.strip().splitlines()[-2])
                written = sum(p.stat().st_size for p in shard_files(out))
                row = {
                    "shape": name, "action": action, "checkpoint_gib": round(size / 2**30, 2),
                    "output_gib": round(written / 2**30, 2), "wall_s": round(seconds, 1),
                    "peak_rss_gib": round(peak / 2**30, 2), "read_s": round(read_s, 1), "write_s": round(write_s, 1),
                    "buffered_write_s": round(buffered_write_s, 1), "direct_write_s": round(direct_write_s, 1),
                    "factorize_s": round(factorize_s, 1),
                    "budget_s": round(read_s + write_s + factorize_s * (1 if verb == "decompose" else 2), 1),
                    "factorize_gflop": round(layer_flops * shape["num_hidden_layers"] / 1e9, 1),
                    "matmul_gflops": round(gflops, 1),
                    "factorize_share_of_peak": round(layer_flops / layer_s / 1e9 / gflops, 3),
                    "parameters_after": report.get("parameters_after", ""), "cold_reads": cold,
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
