"""The prompts a run answers when they are not the held-out split's: `eval.prompts`, a .json or .jsonl file of
`{instruction, input?, output?}` records, AlpacaEval's layout, so its 805 prompts or any instruction set can be
answered."""

from __future__ import annotations

from pathlib import Path

from .read import READERS, DataError, check_file
from .records import field_of, text_field


def read_prompts(path: str | Path) -> list[tuple[list[dict], str]]:
    """(chat messages, reference answer or "") for each record."""
    path = check_file(Path(path).expanduser(), "eval.prompts", (".json", ".jsonl"))
    source, prompts = str(path), []
    for row, record in enumerate(READERS[path.suffix.lower()](path)):
        instruction = text_field(field_of(record, row, source, "instruction"), row, source, "instruction")
        if not instruction.strip():
            raise DataError(f"{source}: row {row} has an empty instruction")
        extra = field_of(record, row, source, "input", optional=True)
        if extra:
            instruction += "\n\n" + text_field(extra, row, source, "input")
        output = field_of(record, row, source, "output", optional=True)
        reference = "" if output is None else text_field(output, row, source, "output")
        prompts.append(([{"role": "user", "content": instruction}], reference))
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts
