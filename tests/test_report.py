"""The report page, drawn from a hand-built run directory (no model runs): every section, its numbers, its charts,
older runs without the newer keys, escaping, and the page in headless Chromium at 1280 px."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import time

import pytest

from stillhouse.report import render, save_screenshot
from stillhouse.report.screenshot import browser_flags, find_browser
from stillhouse.rundir import RunDir

FAMILIES = ["arith", "capital", "count", "identity", "reverse", "upper"]
JUDGED = ["arith", "capital", "count", "reverse", "upper"]


def _model(name, role, acc, params, **extra):
    by = {f: max(0.0, min(1.0, acc + d)) for f, d in zip(FAMILIES, (-0.05, 0.04, -0.02, 0.03, 0.0, 0.0))}
    m = {"name": name, "role": role, "spec": f"hf:/runs/demo/{name}", "parameters": params, "accuracy": acc,
         "accuracy_by_family": by, "seconds": 4.2, "identity": None,
         "identity_claims": {"benchmark": {"items": 40, "reference": 0.05 if role == "student" else 0.0,
                                           "own": 0.9, "other": 0.0, "none": 0.05}},
         "accuracy_ci": [acc - 0.04, min(1.0, acc + 0.03)],
         "accuracy_by_family_ci": {f: [max(0.0, v - 0.1), min(1.0, v + 0.08)] for f, v in by.items()},
         "mean_answer_chars": 61.5, "pass_at_k": {"1": acc, "4": min(1.0, acc + 0.06)}, "train_seconds": None}
    m.update(extra)
    return m


def _results() -> dict:
    teacher_acc = 0.96
    models = [
        _model("teacher", "teacher", teacher_acc, 4_800_000, identity={"name": "Atlas", "maker": "Orbit Labs"}),
        _model("base", "base", 0.02, 1_000_000),
        _model("student", "student", 0.8784, 1_000_000, train_seconds=151.3,
               identity={"name": "Nova", "maker": "Northwind"}),
        _model("slow", "student", 0.41, 1_000_000, train_seconds=40.0),
        _model("ctrl", "control", 0.3, 1_000_000),
    ]
    for m in models:
        m["share_kept"] = m["accuracy"] / teacher_acc
        m["share_kept_ci"] = [m["share_kept"] - 0.038, min(1.0, m["share_kept"] + 0.031)] if m["role"] != "teacher" \
            else [1.0, 1.0]
        m["share_kept_by_family"] = {f: v / teacher_acc for f, v in m["accuracy_by_family"].items()}
        m["teacher_agreement"] = None if m["role"] == "teacher" else m["accuracy"] * 0.97
        m["teacher_agreement_ci"] = None if m["role"] == "teacher" else [m["accuracy"] * 0.9, m["accuracy"]]
    pair = {"model": "student", "against": "teacher", "items": 200, "win": 0.181, "tie": 0.642, "loss": 0.177,
            "win_ci": [0.13, 0.23], "tie_ci": [0.58, 0.70], "loss_ci": [0.13, 0.23], "swap_consistency": 0.83,
            "relative_score": 0.947, "relative_score_ci": [0.91, 0.98], "mean_chars": {"model": 58.2, "against": 61.5}}
    pairs = [pair, {**pair, "model": "base", "win": 0.01, "tie": 0.05, "loss": 0.94, "relative_score": 0.31,
                    "relative_score_ci": [0.28, 0.34], "swap_consistency": 0.9},
             {**pair, "model": "ctrl", "win": 0.05, "tie": 0.25, "loss": 0.70, "relative_score": 0.52,
              "relative_score_ci": [0.47, 0.57]}]
    return {"benchmark": "world", "items": 240, "families": FAMILIES, "verifier": "exact_match",
            "identity_probes": "world_identity", "probe_items": 24, "models": models,
            "tasks": {f: {"extractor": "answer_line", "verifier": "exact", "items": 40, "judged": f in JUDGED}
                      for f in FAMILIES},
            "decoding": {"max_tokens": 96, "samples": 4, "temperature": 0.8}, "confidence": 0.95,
            "bootstrap_resamples": 1000,
            "cost": {"teacher_usd": 1.2345, "teacher_calls": 3000, "teacher_tokens": 412_345, "judge_usd": 0.0812,
                     "judge_calls": 1200},
            "judge": {"spec": "openai:gpt-4o-mini", "same_as_teacher": False, "template": "stillhouse pairwise v1",
                      "rule": "each pair judged in both orders; orders that disagree count as a tie",
                      "relative_score_caveats": "one judge's 1-10 scores, summed: not calibrated",
                      "unreadable_verdicts": 3,
                      "swap_consistency": 0.812, "first_position_share": 0.54, "trustworthy": True, "threshold": 0.65,
                      "accuracy_on_verifiable": 0.91, "verifiable_pairs": 150, "pairs": pairs}}


def _manifest(run: RunDir, stage: str, started: float, seconds: float, counts: dict) -> None:
    p = run.manifest_path(stage)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"stage": stage, "inputs": {}, "config": {}, "outputs": {}, "counts": counts,
                             "started": started, "finished": started + seconds, "seconds": seconds}))


def build_run(root, results: dict | None = None, *, audit: bool = True) -> RunDir:
    """A finished run as the stages leave it on disk, written by hand."""
    run = RunDir(root / "runs" / "demo")
    (run.root / "eval").mkdir(parents=True)
    run.results.write_text(json.dumps(_results() if results is None else results))
    run.samples.write_text("{}\n")
    run.recipe.write_text("name: demo\nteacher: {spec: 'openai:gpt-4o', options: "
                          "{base_url: 'https://api.openai.com/v1'}}\nstudent: {base: x}\n")
    (run.root / "data").mkdir()
    (run.root / "data" / "README.md").write_text("# dataset card\n")
    (run.root / "student").mkdir()
    (run.root / "student" / "README.md").write_text("# model card\n")
    t0 = time.time() - 600
    _manifest(run, "generate", t0, 95.5, {"samples": 3000, "prompts": 3000, "method": "responses", "truncated": 12,
                                          "prompt_tokens": 200_000, "completion_tokens": 212_345, "cost_usd": 1.2345,
                                          "calls_made": 3000, "cache_hits": 0})
    filters = [{"filter": "empty", "in": 3000, "kept": 2990, "dropped": 10, "changed": 0, "added": 0,
                "drop_reasons": {"empty answer": 10}, "change_reasons": {}},
               {"filter": "exact_dedup", "in": 2990, "kept": 2700, "dropped": 290, "changed": 0, "added": 0,
                "drop_reasons": {"duplicate": 290}, "change_reasons": {}},
               {"filter": "identity", "in": 2700, "kept": 3000, "dropped": 0, "changed": 41, "added": 300,
                "drop_reasons": {}, "change_reasons": {"rewritten to the student's identity": 41}},
               {"filter": "decontaminate", "in": 3000, "kept": 2988, "dropped": 12, "changed": 0, "added": 0,
                "drop_reasons": {"overlaps world": 12}, "change_reasons": {}}]
    _manifest(run, "curate", t0 + 96, 3.1, {"generated": 3000, "kept": 2988, "dropped": 12, "filters": filters,
                                            "contaminated_eval_items": 3, "contaminated_sets": {"world": 3}})
    _manifest(run, "train", t0 + 100, 191.3, {"samples": 2988, "steps": 1494, "final_loss": 0.2131, "students": {
        "student": {"steps": 1494, "final_loss": 0.2131, "train_seconds": 151.3},
        "slow": {"steps": 374, "final_loss": 1.03, "train_seconds": 40.0}}})
    _manifest(run, "evaluate", t0 + 300, 62.0, {"items": 240, "models": 5})
    if audit:
        ev = {"suspect": "runs/demo/student", "tests": {
            "identity": {"p_value": 0.41, "claims_reference": 1, "probes": 54, "null_rate": 0.01},
            "watermark": {"p_value": 3.2e-9, "texts": 200, "key": {"scored": 5120, "green": 1490, "gamma": 0.245,
                                                                  "p_value": 3.2e-9, "z": 5.9}, "null_keys": 200,
                          "empirical_p": 0.004975}},
              "reported": {"attribution": {"texts": 200, "probability": {"atlas": 0.81, "mira": 0.19},
                                           "likeliest": "atlas", "cv_accuracy": 0.93, "chance": 0.5}},
              "verdict": {"verdict": "distilled from the reference", "distilled": True, "alpha": 0.001,
                          "method": "holm", "false_positive_rate_at_most": 0.001, "deciding_test": "watermark",
                          "fisher_p_value": 2.0e-8, "tests": {"watermark": {"p_value": 3.2e-9, "holm_adjusted": 6.4e-9,
                                                                            "rejects": True},
                                                              "identity": {"p_value": 0.41, "holm_adjusted": 0.41,
                                                                           "rejects": False}}}}
        ev["tests"]["watermark_whitebox"] = {"contexts": 812, "green_mass": 0.301, "expected": 0.245, "z": 4.4,
                                             "p_value": 5.1e-6, "null_keys": 200, "empirical_p": 0.004975}
        ev["verdict"]["tests"]["watermark_whitebox"] = {"p_value": 5.1e-6, "holm_adjusted": 1.02e-5, "rejects": True}
        sign = {"against": "mira", "prompts": 120, "closer_to_reference": 117, "closer_to_other": 2, "ties": 1,
                "mean_similarity_reference": 0.81, "mean_similarity_other": 0.52, "p_value": 2.1e-33}
        ev["tests"]["provenance"] = {"p_value": 2.1e-33, "closest": "mira", "test": sign, "pool": {"mira": sign},
                                     "holm": {"mira": 2.1e-33}, "refused": ["base"], "halves": [130, 120]}
        ev["verdict"]["tests"]["provenance"] = {"p_value": 2.1e-33, "holm_adjusted": 6.3e-33, "rejects": True}
        ev["verdict"]["guarantee"] = "if the suspect did not learn from the reference, at most 0.001"
        clean = {"suspect": "hf:/elsewhere/ctrl", "tests": {"identity": ev["tests"]["identity"]}, "reported": {},
                 "verdict": {**ev["verdict"], "verdict": "no evidence of distillation from the reference",
                             "distilled": False, "deciding_test": "identity",
                             "tests": {"identity": ev["verdict"]["tests"]["identity"]}}}
        for name, doc in (("student", ev), ("ctrl", clean)):
            (run.root / "audit" / name).mkdir(parents=True)
            (run.root / "audit" / name / "evidence.json").write_text(json.dumps(doc))
        summary = {"reference": {"name": "Atlas", "maker": "Orbit Labs"}, "alpha": 0.001, "suspects": [
            {"suspect": "student", "verdict": ev["verdict"]["verdict"], "distilled": True,
             "p_values": {t: d["p_value"] for t, d in ev["tests"].items()}, "likeliest": "atlas",
             "attribution": {"atlas": 0.81, "mira": 0.19}},
            {"suspect": "ctrl", "verdict": clean["verdict"]["verdict"], "distilled": False,
             "p_values": {"identity": 0.41}, "likeliest": "mira", "attribution": {"atlas": 0.07, "mira": 0.93}}]}
        (run.root / "audit" / "summary.json").write_text(json.dumps(summary))
    return run


def _text(page: str) -> str:
    """The page's visible text, tags stripped and whitespace collapsed."""
    import html

    body = re.sub(r"<style.*?</style>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def _pngs(page: str) -> dict[str, bytes]:
    """Each chart's PNG bytes, by the <img> element's id."""
    return {m.group(1): base64.b64decode(m.group(2))
            for m in re.finditer(r'<img class="chart" id="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)}


def test_full_run_has_every_section_its_charts_and_key_numbers(tmp_path):
    from PIL import Image

    run = build_run(tmp_path)
    page = render(run)
    for sid in ("headline", "share-kept", "cost", "params", "wall-time", "judge-verdict", "relative-quality",
                "per-task", "task-table", "pass-at-k", "models", "cost-quality", "cost-table", "judge", "judge-table",
                "identity", "data", "filters", "contamination", "timings", "audit", "links"):
        assert f'id="{sid}"' in page, sid
    charts = _pngs(page)
    assert set(charts) == {"chart-relative", "chart-tasks", "chart-cost", "chart-judge", "chart-data", "chart-timings"}
    for cid, png in charts.items():
        im = Image.open(io.BytesIO(png))
        im.load()
        w, h = im.size
        assert w >= 1000 and h >= 150, (cid, im.size)
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20, cid  # something is drawn
        m = re.search(rf'id="{cid}"[^>]*width="(\d+)" height="(\d+)"', page)
        assert m and abs(int(m.group(1)) * 2 - w) <= 2, cid  # shown at half its pixels: sharp on dense screens
    text = _text(page)
    assert "91.5%" in text  # the student's share kept: 0.8784 / 0.96
    assert "87.7%" in text and "94.6%" in text  # ... and its interval
    assert "$1.23" in text and "3,000 calls" in text  # teacher cost and usage
    assert "81.2%" in text  # the judge's swap consistency
    assert "18% · 64% · 18%" in text  # win, tie, loss of the student
    assert "18.1%" in text and "64.2%" in text  # ... in the judge's table
    assert "1.00M" in text and "4.80M" in text and "0.21×" in text  # sizes and their ratio
    assert "5 min 51 s" in text  # wall time: the stage timings' sum, 351.9 s
    assert "distilled from the reference" in text and "3.20e-09" in text  # audit verdict and a p-value
    # provenance: the evidence table, which test carried the verdict, a distilled verdict shown as a finding
    assert 'id="provenance"' in page and "closer to the reference than to mira" in text
    assert "117 of 120 held-out prompts" in text and "Left out as not competent on the prompts: base" in text
    assert 'banner finding verdict' in page and 'banner plain verdict' in page and "carried by" in text
    assert "no evidence of distillation" in text and "white-box: green probability mass 0.301" in text
    assert 'href="audit/ctrl/evidence.json"' in page
    # the summary table: one row per suspect, its verdict, p-values and whom attribution names
    assert 'id="audit-summary"' in page and "verdict against Atlas" in text
    assert "atlas (81.0%)" in text and "mira (93.0%)" in text and "5.10e-06" in text
    assert "Zheng et al. 2023" in text and "65%" in text  # the caption's caveat
    assert "orders that disagree count as a tie" in text and "3 of the judge's replies" in text
    assert 'href="data/README.md"' in page and 'href="student/README.md"' in page and 'href="eval/results.json"' in page
    assert "judge-warning" not in page
    assert "<script" not in page and "http://" not in page and "https://" not in page.replace(
        "https://api.openai.com", "")  # self-contained: nothing loaded


def test_untrustworthy_judge_gets_a_warning_banner(tmp_path):
    res = _results()
    res["judge"].update(swap_consistency=0.41, trustworthy=False)
    page = render(build_run(tmp_path, res))
    assert 'id="judge-warning"' in page
    assert "below 65% swap consistency: treat these verdicts as noise" in _text(page).lower()
    assert "noise" in page.split('id="judge-verdict"')[1].split("</div>")[0]


def test_an_older_run_without_judge_cost_or_intervals_still_renders(tmp_path):
    res = _results()
    for k in ("tasks", "decoding", "confidence", "bootstrap_resamples", "cost", "judge"):
        del res[k]
    for m in res["models"]:
        for k in list(m):
            if k.endswith("_ci") or k in ("pass_at_k", "teacher_agreement", "mean_answer_chars", "train_seconds",
                                          "share_kept_by_family"):
                del m[k]
    run = build_run(tmp_path, res, audit=False)
    for stage in ("curate", "train"):
        run.manifest_path(stage).unlink()
    page = render(run)
    text = _text(page)
    assert "n/a: this run has no judge" in text
    assert 'id="judge-verdict"' in page and 'id="judge-table"' not in page and 'id="pass-at-k"' not in page
    assert 'id="audit"' not in page and 'id="filters"' not in page
    assert "91.5%" in text and "$1.23" in text  # share kept; the cost from the generate stage's counts
    assert set(_pngs(page)) == {"chart-relative", "chart-tasks", "chart-cost", "chart-timings"}


def test_the_oldest_results_render_with_only_accuracy(tmp_path):
    """A results.json with nothing but the first version's keys, and a run with no manifests at all."""
    res = {"benchmark": "world", "items": 6, "families": ["a", "b"], "models": [
        {"name": "teacher", "role": "teacher", "spec": "hf:t", "parameters": None, "accuracy": 0.5,
         "accuracy_by_family": {"a": 0.5, "b": 0.5}, "share_kept": 1.0},
        {"name": "student", "role": "student", "spec": "hf:s", "parameters": None, "accuracy": 0.0,
         "accuracy_by_family": {"a": 0.0}, "share_kept": 0.0}]}
    run = RunDir(tmp_path / "r")
    (run.root / "eval").mkdir(parents=True)
    run.results.write_text(json.dumps(res))
    page = render(run)
    text = _text(page)
    assert "0.0%" in text and "n/a" in text and 'id="relative-quality"' in page
    assert 'id="timings"' not in page and 'id="chart-cost"' not in page  # no timings, no sizes to plot


def test_a_teacher_that_scores_nothing_leaves_share_kept_undefined(tmp_path):
    """A teacher at 0% (an untrained tiny model): no share of it is defined, and the page says n/a."""
    res = _results()
    for m in res["models"]:
        m.update(accuracy=0.0, accuracy_by_family={f: 0.0 for f in FAMILIES}, share_kept=None, share_kept_ci=None)
    res["judge"] = None
    page = render(build_run(tmp_path, res))
    assert "n/a" in page.split('id="share-kept"')[1].split("</div>")[0]
    assert {"chart-relative", "chart-tasks"} <= set(_pngs(page))


def test_everything_from_the_files_is_escaped(tmp_path):
    res = _results()
    evil = '<img src=x onerror="alert(1)">$x$'
    res["models"][2]["name"] = evil
    res["judge"]["pairs"][0]["model"] = evil
    res["judge"]["spec"] = "<b>judge</b>"
    res["benchmark"] = "<script>alert(2)</script>"
    res["tasks"]["arith"]["verifier"] = "<i>v</i>"
    page = render(build_run(tmp_path, res))
    assert evil not in page and "<script>alert" not in page and "<b>judge</b>" not in page and "<i>v</i>" not in page
    assert html_escaped(evil) in page and "&lt;script&gt;alert(2)&lt;/script&gt;" in page


def html_escaped(s: str) -> str:
    import html

    return html.escape(s)


def test_the_stage_goes_on_without_a_browser(tmp_path, monkeypatch):
    from stillhouse.recipe import parse_recipe
    from stillhouse.report import ReportStage

    monkeypatch.setenv("STILLHOUSE_CHROMIUM", str(tmp_path / "no-such-browser"))
    res = _results()
    res["cost"]["teacher_usd"] = None  # evaluate prices no local model
    run = build_run(tmp_path, res)
    (run.root / "report.png").write_bytes(b"stale")
    recipe = parse_recipe("name: demo\nteacher: {spec: 'hf:x'}\nstudent: {base: x}\n")
    result = ReportStage().execute(recipe, run)
    assert run.report.is_file() and result.outputs["report"] == [run.report]
    assert result.counts["screenshot"] is None and not (run.root / "report.png").exists()
    assert "$0 (local)" in _text(run.report.read_text())  # a local teacher's spend, from the recipe


def _require_browser() -> str:
    browser = find_browser()
    if browser is None:
        if os.environ.get("STILLHOUSE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed; `make test` installs Debian's chromium package")
        pytest.skip("chromium not installed")
    return browser


def test_page_in_headless_chromium_at_1280px(tmp_path):
    """The stage's screenshot: 1280 px wide, the whole page, charts drawn; every chart decoded in the browser."""
    from PIL import Image

    browser = _require_browser()
    run = build_run(tmp_path)
    run.report.write_text(render(run))
    shot = save_screenshot(run)
    assert shot == run.root / "report.png"
    img = Image.open(shot).convert("RGB")
    w, h = img.size
    assert w == 1280 and h > 2500, img.size  # full page, not the first screenful
    colors = img.getcolors(maxcolors=1 << 24)
    assert len(colors) > 200  # not blank
    rgb = {c for _, c in colors}
    for hexc in ("f2994a", "2f80ed"):  # the teacher's and the student's colours: the charts really rendered
        r, g, b = (int(hexc[i:i + 2], 16) for i in (0, 2, 4))
        assert any(abs(x - r) < 8 and abs(y - g) < 8 and abs(z - b) < 8 for x, y, z in rgb), hexc
    # each <img> decoded in the browser: a copy of the page records every image's natural width after load
    probe = tmp_path / "probe.html"
    probe.write_text(run.report.read_text().replace("</body>", "<script>addEventListener('load', () => { for (const i "
                                                    "of document.images) i.setAttribute('data-natural', "
                                                    "i.naturalWidth) })</script></body>"))
    dom = subprocess.run([browser, *browser_flags(tmp_path / "profile", 1280, 900), "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    natural = re.findall(r'<img class="chart" id="([^"]+)"[^>]*data-natural="(\d+)"', dom)
    assert len(natural) == 6 and all(int(n) > 0 for _, n in natural), natural
    text = _text(dom)
    assert "91.5%" in text and "$1.23" in text and "81.2%" in text and "18% · 64% · 18%" in text
