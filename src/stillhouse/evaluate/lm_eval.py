"""lm-evaluation-harness task files for stillhouse's checkable items.

`write_task` turns items with a `prompt` and an `answer` (the world's held-out split, or a user's JSONL
tasks) into a `generate_until` task that lm-eval scores as stillhouse's evaluate stage does: greedy
generation to the end of the assistant turn, the last `Answer:` line taken as the final answer, exact
match against the item's answer. An outside harness agreeing with the in-house evaluation on the same
outputs is the check that neither is fooling itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["{stop}"]
  max_gen_toks: {max_tokens}
  do_sample: false
  temperature: 0
filter_list:
  - name: final_answer
    filter:
      - function: regex
        regex_pattern: "Answer:\\\\s*(.*?)\\\\s*$"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(folder: str | Path, name: str, items: Iterable[dict], max_tokens: int = 96,
               stop: str = "<|im_end|>") -> Path:
    """Write `name`.yaml and its data (`name`.jsonl, one item a line, every field kept) into `folder`, for
    `lm_eval.tasks.TaskManager(include_path=folder)`; returns the task file. `stop` is the chat template's end of
    turn (the world's `<|im_end|>` by default)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    rows = list(items)
    bad = [i for i, r in enumerate(rows) if not isinstance(r.get("prompt"), str) or not isinstance(r.get("answer"), str)]
    if bad:
        raise ValueError(f"items {bad[:5]} lack a string prompt and answer")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / f"{name}.yaml"
    task.write_text(_TASK.format(name=name, data=data, max_tokens=max_tokens, stop=stop))
    return task
