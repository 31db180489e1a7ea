"""A share of the teacher kept is a result only when the teacher's score can carry it: a teacher right on 1 of 20
items made the headline say "share kept 200% (100–400%)". One rule (`share_kept_caveat`) decides, and the report
warns in the number's place."""

from __future__ import annotations

import pytest

from stillhouse.report import render
from stillhouse.report.sections import share_kept_caveat
from tests.test_report import FAMILIES, _pngs, _results, _text, build_run


@pytest.mark.parametrize("args, why", [
    ((1, 20, 0.05, [0.0, 0.15], [1.0, 4.0]), "right on only 1 of 20 items"),
    ((30, 200, 0.15, [0.10, 0.20], [0.8, 1.1]), "below 20%"),
    ((24, 100, 0.24, [0.10, 0.32], [0.8, 1.1]), "factor of 2"),
    ((90, 100, 0.9, [0.84, 0.95], [0.55, 1.12]), "57 points wide"),
])
def test_each_reason_to_distrust_a_share(args, why):
    assert why in share_kept_caveat(*args)


@pytest.mark.parametrize("args", [
    (230, 240, 0.96, [0.92, 0.99], [0.88, 0.95]),  # the demo's kind of run
    (230, 240, 0.96, [0.92, 0.99], [0.0, 0.05]),  # a base model near zero: far apart as a ratio, and fine
    (None, None, 0.5, None, None),  # an older results.json with nothing but accuracies
])
def test_a_share_the_teacher_can_carry_is_kept(args):
    assert share_kept_caveat(*args) is None


def _weak_teacher() -> dict:
    """The report fixture with a teacher right on 1 of 20 items and a student right on 2: share 200% (100–400%)."""
    res = _results()
    res["items"] = 20
    res["tasks"] = {f: {**t, "items": 20 if f == "arith" else 0} for f, t in res["tasks"].items()}
    res["tasks"] = {"arith": res["tasks"]["arith"]}
    res["families"] = ["arith"]
    for m in res["models"]:
        acc = {"teacher": 0.05, "student": 0.10}.get(m["name"], 0.0)
        m.update(accuracy=acc, accuracy_by_family={"arith": acc}, accuracy_ci=[max(0.0, acc - 0.05), acc + 0.1],
                 accuracy_by_family_ci={"arith": [max(0.0, acc - 0.05), acc + 0.1]})
        m["share_kept"] = acc / 0.05
        m["share_kept_ci"] = [1.0, 4.0] if m["name"] == "student" else [0.0, 1.0]
    res["models"][0]["share_kept_ci"] = [1.0, 1.0]
    return res


def test_the_report_warns_instead_of_headlining_a_share_of_a_weak_teacher(tmp_path):
    page = render(build_run(tmp_path, _weak_teacher()))
    card = page.split('id="share-kept"')[1].split("</div>")[0]
    assert "not meaningful" in card and "200%" not in card and "right on only 1 of 20 items" in _text(card)
    summary = _text(page.split('class="summary"')[1].split("</p>")[0])
    assert "keeps" not in summary and "no share of the teacher is given" in summary
    assert 'id="share-kept-warning"' in page
    assert "share of the teacher kept is not meaningful: the teacher was right on only 1 of 20 items" in _text(page)
    assert "chart-relative" in _pngs(page)  # the chart is drawn, with a note in place of the noisy bars
    # the cost chart leaves the noisy shares out and says so
    assert "Left out, their share not meaningful" in _text(page)


def test_a_sound_run_has_no_share_warning(tmp_path):
    page = render(build_run(tmp_path))
    assert 'id="share-kept-warning"' not in page and "not meaningful" not in page
    assert "91.5%" in page.split('id="share-kept"')[1].split("</div>")[0]
    assert len(FAMILIES) == 6
