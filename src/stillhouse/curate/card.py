"""The dataset card: a Hugging Face README.md beside the curated Parquet.

YAML front matter (license, tags, task categories, size category, and a `configs` entry
pointing at the Parquet, so `datasets.load_dataset(DIRECTORY)` finds it) and a body a
person reads: where the data came from (teachers, generation methods), what curation did
(counts per filter with reasons, deduplication, contaminated evaluation items) and the
teacher's terms of use, with any override of a conflict stated plainly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from stillhouse.curate import FilterResult

_SIZES = [(10 ** 3, "n<1K"), (10 ** 4, "1K<n<10K"), (10 ** 5, "10K<n<100K"), (10 ** 6, "100K<n<1M"),
          (10 ** 7, "1M<n<10M"), (10 ** 8, "10M<n<100M"), (10 ** 9, "100M<n<1B"), (10 ** 10, "1B<n<10B"),
          (10 ** 11, "10B<n<100B"), (10 ** 12, "100B<n<1T")]


def size_category(n: int) -> str:
    """The Hub's size category for `n` rows."""
    return next((label for limit, label in _SIZES if n < limit), "n>1T")


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _reasons(d: Mapping[str, int]) -> str:
    return "; ".join(f"{_cell(r)}: {n}" for r, n in d.items()) or "-"


def write_card(directory: str | Path, data_file: str, *, num_rows: int, teachers: Iterable[Mapping[str, Any]],
               methods: Mapping[str, int], filters: Iterable[tuple[str, FilterResult | Mapping[str, Any]]],
               terms: Mapping[str, Any], rows_in: int | None = None, title: str = "Distilled dataset",
               license: str = "other", tags: Iterable[str] = (), task_categories: Iterable[str] = ("text-generation",),
               languages: Iterable[str] = (), notes: Iterable[str] = ()) -> Path:
    """Write `directory/README.md` for the curated Parquet `directory/data_file`; its path.

    `teachers`: one mapping per teacher (spec, model, backend, anything else worth a column).
    `methods`: generation method -> rows. `filters`: (name, FilterResult or its summary) in
    the order applied. `terms`: the teacher's terms of use: name, url, note, intended_use,
    override (true when the run went ahead despite a conflict with the intended use).
    """
    directory = Path(directory)
    teachers = [dict(t) for t in teachers]
    filters = [(name, r.summary() if isinstance(r, FilterResult) else dict(r)) for name, r in filters]
    meta: dict[str, Any] = {
        "license": license,
        "task_categories": list(task_categories),
        "tags": ["synthetic", "distillation", "stillhouse", *tags],
        "size_categories": [size_category(num_rows)],
        "pretty_name": title,
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}],
    }
    if languages := list(languages):
        meta["language"] = languages
    if license == "other" and terms.get("name"):
        meta["license_name"] = str(terms["name"])
        if terms.get("url"):
            meta["license_link"] = str(terms["url"])

    out = [f"# {title}", "",
           f"{num_rows:,} chat samples (OpenAI `messages`, the teacher's answer last) with the provenance of each "
           f"answer, generated and curated by stillhouse.", ""]

    out += ["## Teachers", ""]
    cols = sorted({k for t in teachers for k in t}, key=lambda k: (k != "spec", k))
    if teachers and cols:
        out += ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        out += ["| " + " | ".join(_cell(t.get(c, "")) for c in cols) + " |" for t in teachers]
    else:
        out.append("Not recorded.")
    out += ["", "## Generation methods", "", "| method | rows |", "| --- | --- |"]
    out += [f"| {_cell(m)} | {n:,} |" for m, n in methods.items()] or ["| - | - |"]

    out += ["", "## Curation", ""]
    dropped, added = (sum(int(s.get(k) or 0) for _, s in filters) for k in ("dropped", "added"))
    if rows_in is not None:
        out += [f"{rows_in:,} generated rows in, {num_rows:,} out: {dropped:,} dropped"
                + (f", {added:,} added" if added else "") + ".", ""]
    out += ["Filters in the order applied; each keeps the rows it saw, minus those it dropped, plus those it added.",
            "",
            "| filter | kept | dropped | changed | added | drop reasons | change reasons |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    out += [f"| {_cell(name)} | {s.get('kept', 0):,} | {s.get('dropped', 0):,} | {s.get('changed', 0):,} | "
            f"{s.get('added', 0):,} | {_reasons(s.get('drop_reasons', {}))} | {_reasons(s.get('change_reasons', {}))} |"
            for name, s in filters] or ["| none | | | | | | |"]

    dedup = [(name, s) for name, s in filters if name in ("exact_dedup", "near_dedup", "novelty")]
    out += ["", "### Deduplication", ""]
    out += [f"- `{name}`: {s.get('dropped', 0):,} dropped" for name, s in dedup] or ["No deduplication filter ran."]

    out += ["", "### Decontamination", ""]
    contam = [(name, s["contamination"]) for name, s in filters if "contamination" in s]
    if not contam:
        out.append("No decontamination filter ran: the data was not checked against evaluation sets.")
    for name, sets in contam:
        for ev, c in sets.items():
            hit = c.get("hit_indices", [])
            shown = ", ".join(str(i) for i in hit[:50]) + (f", … ({len(hit) - 50} more)" if len(hit) > 50 else "")
            out.append(f"- `{ev}`: {c.get('items_hit', len(hit)):,} of {c.get('items', 0):,} evaluation items "
                       f"found in the generated data" + (f" (items {shown}); the samples holding them were dropped"
                                                         if hit else "."))

    out += ["", "## Teacher's terms of use", ""]
    if terms:
        link = f"[{terms.get('name', 'terms')}]({terms['url']})" if terms.get("url") else terms.get("name", "unknown")
        out += [f"- Terms: {link}", f"- Summary: {terms.get('note', '-')}",
                f"- Intended use of this data: {terms.get('intended_use', 'not declared')}"]
        if terms.get("override"):
            out += ["", "**The intended use conflicts with the teacher's terms; the run was told to go ahead anyway "
                        "(`use.override_terms_conflict: true`). Check the terms before using this data.**"]
        out += ["", "A summary for orientation, not legal advice."]
    else:
        out.append("Not declared: check the teacher's terms before any use.")

    if notes := list(notes):
        out += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    out += ["", "## Loading", "", "```python", "from datasets import load_dataset", "",
            f'ds = load_dataset("parquet", data_files="{data_file}")', "```", ""]

    path = directory / "README.md"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(out))
    tmp.replace(path)
    return path
