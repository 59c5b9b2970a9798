"""README's family x capability table is generated from the family table in conftest.py and the family files,
so it cannot drift: this test fails when they disagree. Regenerate it with

    .venv/bin/python tests/test_readme.py --write
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from conftest import FAMILY_TABLE

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- family-table:start -->", "<!-- family-table:end -->"


def family_table() -> str:
    """One line per family that has a row in FAMILY_TABLE; every capability marked "yes" is a family-level test
    (decompose exact + stock reload, prune at ratio 0 exact, top-r = rank-r, generation with the cache, fresh-process
    reload of the pruned checkpoint, fine-tune exact at init + merge, heal exact at init) run on that row."""
    from clover.families import FAMILIES

    lines = [
        "| family (model_type) | file | decompose | Q-K prune | V-O prune | cache shrinks on | fine-tune, heal |"
        " fresh-process reload | weights tested |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows_by_type = _rows_by_type()
    for family in FAMILIES:
        keys = family.model_types + family.model_classes
        archs = [arch for model_type in keys for arch in rows_by_type.get(model_type, [])]
        if not archs:
            continue
        qk = "yes" if all(FAMILY_TABLE[a].qk_exact for a in archs) else _qk_cell(family, archs)
        real = sorted({FAMILY_TABLE[a].real for a in archs if FAMILY_TABLE[a].real})
        weights = ", ".join(real) + " (real); tiny random" if real else "tiny random"
        module = family.__class__.__module__.rsplit(".", 1)[-1]
        lines.append(
            f"| {family.examples} ({', '.join(keys)}) | `families/{module}.py` | yes | {qk} | yes | "
            f"{family.caches} | yes | yes | {weights} |"
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


def test_readme_family_table_matches_the_test_table():
    assert _section(README.read_text()) == family_table(), "run: .venv/bin/python tests/test_readme.py --write"


if __name__ == "__main__" and "--write" in sys.argv:
    text = README.read_text()
    block = re.search(re.escape(START) + r".*?" + re.escape(END), text, re.S).group(0)
    README.write_text(text.replace(block, f"{START}\n{family_table()}\n{END}"))
