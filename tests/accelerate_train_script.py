"""Train a tiny CLOVER Llama for a few steps, then save the merged weights (rank 0).

Run as ``python accelerate_train_script.py OUT`` (one process, batch 4) or under
``accelerate launch --multi_gpu --num_processes 2 ... accelerate_train_script.py OUT`` (two processes, batch 2
each; on a machine without GPUs accelerate then runs torchrun + gloo DDP on the CPU):
both see the same global batches in the same order, so the merged weights must agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import VOCAB, build_tiny  # noqa: E402

from clover.finetune import CloverConfig, CloverModel  # noqa: E402

GLOBAL_BATCH, STEPS, LENGTH = 4, 4, 12


def main(out: str) -> None:
    """Train with DDP when launched on several processes; write the merged state dict to ``out``."""
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    per_process = GLOBAL_BATCH // accelerator.num_processes
    first = accelerator.process_index * per_process
    data = torch.randint(3, VOCAB, (STEPS, GLOBAL_BATCH, LENGTH), generator=torch.Generator().manual_seed(0))

    model = CloverModel(build_tiny("llama"), CloverConfig(dropout=0.0)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in range(STEPS):
        ids = data[step, first : first + per_process]
        # equal lengths, no padding: the mean of the per-process mean losses is the global mean loss
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        merged = accelerator.unwrap_model(model).merge_and_unload()
        save_file({name: t.detach().clone().contiguous() for name, t in merged.state_dict().items()}, out)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
