"""Curation counts when a filter adds rows: the manifest, the dataset card and the report count drops and additions
apart (generated - dropped + added = kept), never a negative drop."""

from __future__ import annotations

import json

from tests.test_curate_stage import _curate, _prompts


def test_added_pairs_are_counted_apart_from_drops(tmp_path):
    prompts = _prompts(tmp_path, [{"prompt": "Name a colour."}, {"prompt": "Name a colour."},
                                  {"prompt": "Name a fruit."}])
    m, rows, _ = _curate(tmp_path, prompts, "{filters: [{name: exact_dedup}, {name: identity, add_identity_pairs: 20, "
                                            "languages: [en]}]}")
    c = m["counts"]
    assert c["generated"] == 3 and c["dropped"] == 1 and c["added"] == 20 and c["kept"] == len(rows) == 22
    assert c["generated"] - c["dropped"] + c["added"] == c["kept"]
    steps = {s["filter"]: s for s in c["filters"]}
    assert steps["identity"]["added"] == 20 and steps["identity"]["dropped"] == 0
    card = (tmp_path / "run" / "data" / "README.md").read_text()
    assert "3 generated rows in, 22 out: 1 dropped, 20 added." in card
    assert "| identity | 22 | 0 | 0 | 20 |" in card


def test_the_report_says_dropped_and_added(tmp_path):
    from stillhouse.report import render
    from tests.test_report import _text, build_run

    run = build_run(tmp_path)
    page = render(run)
    text = _text(page)
    # the fixture's filters drop 10 + 290 + 12 and the identity filter adds 300
    assert "3,000 samples generated, 2,988 kept for training ( 312 dropped, 300 added by curation)" in text
    assert "−" not in text.split("samples generated")[1].split("kept for training")[0]
    table = page.split('id="filters">')[1].split("</table>")[0]
    assert _text(table.split("</thead>")[0]).split() == \
        ["filter", "in", "kept", "dropped", "added", "rewritten", "reasons"]
    assert "identity 2,700 3,000 0 300 41" in _text(table)


def test_an_older_manifest_with_a_negative_drop_reads_right(tmp_path):
    """Manifests written before `added` said dropped = generated - kept (-20 when pairs were added)."""
    from stillhouse.report.sections import curation_totals

    assert curation_totals({"generated": 100, "kept": 120, "dropped": -20}) == (0, 0)
    assert curation_totals({"generated": 100, "kept": 120, "dropped": -20, "filters": [
        {"filter": "identity", "kept": 120, "dropped": 0, "added": 20}]}) == (0, 20)
    assert json.dumps(curation_totals({"dropped": 5, "added": 2})) == "[5, 2]"
