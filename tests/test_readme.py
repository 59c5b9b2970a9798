"""README's family x capability table is generated from the family table in conftest.py and the family files,
so it cannot drift: this test fails when they disagree. Regenerate it with

    .venv/bin/python tests/test_readme.py --write
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import conftest
from conftest import FAMILY_TABLE, GENERATIVE

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"


# Each capability column: the family-level tests that must all be parametrised over every row of a family for its
# cell to read "yes" (a tuple: any one of its tests will do, e.g. the diffusers UNet's own fresh-process reload).
# Read from the tests' parametrisation, so a row a test leaves out reads "not tested" here, not "yes".
CAPABILITY_TESTS: dict[str, list[str | tuple[str, ...]]] = {
    "decompose": [
        "test_decompose::test_factorized_model_computes_the_same_function",
        "test_decompose::test_decomposed_checkpoint_reloads_with_stock_transformers",
    ],
    "prune": [
        "test_prune::test_pruning_nothing_is_exact",
        "test_prune::test_calibrated_pruning_nothing_is_exact",
        "test_prune::test_keeping_top_r_equals_rank_r_truncation",
    ],
    "generation with the cache": [
        "test_prune::test_generation_with_cache_equals_without_and_cache_holds_only_kept_dims",
    ],
    "fine-tune, heal": [
        "test_finetune::test_wrapped_model_is_exact_at_init",
        "test_finetune::test_merge_gives_a_plain_model_with_the_trained_function",
        "test_heal::test_adapter_on_a_pruned_model_is_exact_trains_and_merges_into_the_pruned_layout",
    ],
    "fresh-process reload": [
        (
            "test_prune::test_checkpoint_loads_with_trust_remote_code_in_a_fresh_process",
            "test_unet::test_saved_unet_loads_with_diffusers_automodel_in_a_fresh_process_without_clover",
        )
    ],
}


def rows_tested_by(test: str) -> set[str]:
    """The family-table rows a test is parametrised over (its ``tiny_arch`` fixture or ``arch`` parameter)."""
    module, name = test.split("::")
    function = getattr(importlib.import_module(module), name)
    if "tiny_arch" in inspect.signature(function).parameters:  # the fixture's own params, whatever they are
        return set(conftest.tiny_arch._fixture_function_marker.params)
    for mark in getattr(function, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0].split(",") if isinstance(mark.args[0], str) else list(mark.args[0])
        names = [n.strip() for n in names]
        if "arch" in names:
            values = [getattr(v, "values", v) for v in mark.args[1]]  # pytest.param(...) carries .values
            return {v if len(names) == 1 else v[names.index("arch")] for v in values}
    raise AssertionError(f"{test} is parametrised over no row of the family table (no tiny_arch, no arch)")


def _cell(capability: str, archs: list[str]) -> str:
    if capability == "generation with the cache" and not set(archs) & set(GENERATIVE):
        return "no decoder"
    for requirement in CAPABILITY_TESTS[capability]:
        alternatives = requirement if isinstance(requirement, tuple) else (requirement,)
        covered = set().union(*(rows_tested_by(test) for test in alternatives))
        if missing := [arch for arch in archs if arch not in covered]:
            return f"not tested ({', '.join(missing)})"
    return "yes"


def family_table() -> str:
    """One line per family that has a row in FAMILY_TABLE; a capability reads "yes" when its family-level tests
    (``CAPABILITY_TESTS``: decompose exact + stock reload; pruning that removes nothing exact with all four methods,
    top-r = rank-r; fine-tune exact at init + merge, heal exact at init; fresh-process reload of the pruned
    checkpoint) are parametrised over every row of the family."""
    from clover.families import FAMILIES

    lines = [
        "| family (model_type) | file | decompose | Q-K prune | V-O prune | cache shrinks on | generation with the "
        "cache | fine-tune, heal | fresh-process reload | weights tested |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows_by_type = _rows_by_type()
    for family in FAMILIES:
        keys = family.model_types + family.model_classes
        archs = [arch for model_type in keys for arch in rows_by_type.get(model_type, [])]
        if not archs:
            continue
        qk = "yes" if all(FAMILY_TABLE[a].qk_exact for a in archs) else _qk_cell(family, archs)
        if _cell("prune", archs) != "yes":
            qk = vo = _cell("prune", archs)
        else:
            vo = "yes"
        real = sorted({FAMILY_TABLE[a].real for a in archs if FAMILY_TABLE[a].real})
        weights = ", ".join(real) + " (real); tiny random" if real else "tiny random"
        module = family.__class__.__module__.rsplit(".", 1)[-1]
        cells = [_cell(capability, archs) for capability in ("generation with the cache", "fine-tune, heal")]
        lines.append(
            f"| {family.examples} ({', '.join(keys)}) | `families/{module}.py` | {_cell('decompose', archs)} | {qk} | "
            f"{vo} | {family.caches} | {' | '.join(cells)} | {_cell('fresh-process reload', archs)} | {weights} |"
        )
    return "\n".join(lines)


def _rows_by_type() -> dict[str, list[str]]:
    rows_by_type: dict[str, list[str]] = {}
    for arch, row in FAMILY_TABLE.items():
        # a diffusers row has no model_type: its family names the model class
        rows_by_type.setdefault(getattr(row.config(), "model_type", None) or row.model, []).append(arch)
    return rows_by_type


def _qk_cell(family, archs: list[str]) -> str:
    if any(FAMILY_TABLE[a].qk_exact for a in archs):
        return "where exact (" + ", ".join(a for a in archs if FAMILY_TABLE[a].qk_exact) + ")"
    stacks = sorted({stack for a in archs for stack in FAMILY_TABLE[a].qk_exact_stacks})
    if stacks:  # exact in some stacks only: pruned there when the pruning is restricted to them
        return f"{', '.join(stacks)} only (`--qk-stacks {','.join(stacks)}`); not the others: {family.qk_blocker}"
    return f"no: {family.qk_blocker}" if family.qk_blocker else "no"


def _section(text: str) -> str:
    match = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), text, re.S)
    assert match, f"README.md lacks the {START} ... {END} markers"
    return match.group(1).rstrip("\n")


def test_every_model_type_a_family_claims_has_a_row_of_the_family_table():
    # a family (or one of its model types) without a row would get none of the family-level tests, yet be claimed
    from clover.families import FAMILIES

    rows_by_type = _rows_by_type()
    claimed = [key for family in FAMILIES for key in family.model_types + family.model_classes]
    assert claimed and [key for key in claimed if key not in rows_by_type] == []


def test_a_row_a_capability_test_leaves_out_reads_not_tested():
    assert _cell("fresh-process reload", ["llama"]) == "yes"
    assert _cell("fresh-process reload", ["llama", "no-such-row"]) == "not tested (no-such-row)"
    assert rows_tested_by("test_unet::test_saved_unet_loads_with_diffusers_automodel_in_a_fresh_process_without_clover")
    assert "unet" not in rows_tested_by("test_prune::test_checkpoint_loads_with_trust_remote_code_in_a_fresh_process")


def test_readme_family_table_matches_the_test_table():
    assert _section(README.read_text()) == family_table(), "run: .venv/bin/python tests/test_readme.py --write"


if __name__ == "__main__" and "--write" in sys.argv:
    text = README.read_text()
    block = re.search(re.escape(START) + r".*?" + re.escape(END), text, re.S).group(0)
    README.write_text(text.replace(block, f"{START}\n{family_table()}\n{END}"))
