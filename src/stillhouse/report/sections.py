"""The report's sections, each drawn from the run directory's files alone.

Every section is a function of one `Run` (`runfiles.py`) returning HTML, or "" when the run
has nothing for it; a number the run lacks is shown as n/a. Everything taken from the files
is escaped (`fmt.e`).
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from stillhouse.report import charts
from stillhouse.report.fmt import (ci_span, count, duration, e, img, interval, num, params, pct, pct_ci,
                                   section, table, td, usd)
from stillhouse.report.runfiles import Run, preference

SWAP_THRESHOLD = 0.65  # Zheng et al. 2023: GPT-4 kept its verdict under swapped answer order 65% of the time

# When a share of the teacher kept is too noisy to read as a number: `share_kept_caveat`.
MIN_TEACHER_CORRECT = 10
MIN_TEACHER_ACCURACY = 0.20
MAX_TEACHER_CI_RATIO = 2.0
MAX_SHARE_CI_WIDTH = 0.50


def share_kept_caveat(teacher_correct: int | None, teacher_items: int | None, teacher_accuracy: float | None,
                      teacher_ci, share_ci) -> str | None:
    """Why a share of the teacher kept must not be read as a number (a phrase), or None when it may be.

    The share is the student's accuracy divided by the teacher's, so all the uncertainty in the teacher's score lands
    in the denominator, and a teacher that is rarely right makes the ratio swing wildly: right on 1 of 20 items, it
    makes a student right on 2 "keep 200%" (a bootstrap interval of 100–400%), a number that says nothing about how
    much of the teacher was kept. So a share is a result only when
    - the teacher was right on at least MIN_TEACHER_CORRECT items (with fewer, one item more or less moves the share
      by a tenth or more),
    - the teacher's accuracy is at least MIN_TEACHER_ACCURACY (below it the teacher has little to keep, and a student
      beats it by chance or by a quirk of format as easily as by learning),
    - the upper end of the teacher's own interval is at most MAX_TEACHER_CI_RATIO times its lower end (else the
      denominator is not known to within a factor of two, whatever the student did; a ratio rule on the teacher's
      interval rather than on the share's, because a share near 0 — a base model's — is a fine result with an
      interval such as 0–5% whose ends are far apart as a ratio), and
    - the share's own interval is at most MAX_SHARE_CI_WIDTH (50 points) wide.
    A check is skipped where the run lacks its number (an older results.json)."""
    if teacher_correct is not None and teacher_correct < MIN_TEACHER_CORRECT:
        of = f" of {teacher_items:,}" if teacher_items else ""
        return (f"the teacher was right on only {teacher_correct:,}{of} items, too few for a share of its score to "
                "mean anything")
    if teacher_accuracy is not None and teacher_accuracy < MIN_TEACHER_ACCURACY:
        return (f"the teacher's own accuracy is {pct(teacher_accuracy)}, below {pct(MIN_TEACHER_ACCURACY, 0)}: too "
                "little to measure a share of")
    t = interval(teacher_ci)
    if t is not None and t[1] > 0 and (t[0] <= 0 or t[1] / t[0] > MAX_TEACHER_CI_RATIO):
        return (f"the teacher's own accuracy is uncertain by more than a factor of {MAX_TEACHER_CI_RATIO:g} (interval "
                f"{pct(t[0])}–{pct(t[1])})")
    c = interval(share_ci)
    if c is not None and c[1] - c[0] > MAX_SHARE_CI_WIDTH:
        return (f"its interval, {pct(c[0], 0)}–{pct(c[1], 0)}, is {100 * (c[1] - c[0]):.0f} points wide "
                f"(more than {100 * MAX_SHARE_CI_WIDTH:.0f})")
    return None


def _teacher_items(r: Run) -> tuple[int | None, int | None]:
    """(items the teacher got right, items) on the benchmark, from its per-family accuracy and the families' sizes
    (or its accuracy and the item count, in a run without per-family sizes); Nones where the run lacks them."""
    t = r.teacher or {}
    tasks, by = r.res.get("tasks"), t.get("accuracy_by_family") or {}
    sizes = {f: num(v.get("items")) for f, v in tasks.items() if isinstance(v, dict)} if isinstance(tasks, dict) else {}
    if sizes and all(n is not None for n in sizes.values()) and all(num(by.get(f)) is not None for f in sizes):
        return sum(round(num(by[f]) * n) for f, n in sizes.items()), int(sum(sizes.values()))
    items, acc = num(r.res.get("items")), num(t.get("accuracy"))
    if items and acc is not None:
        return round(acc * items), int(items)
    return None, (int(items) if items else None)


def share_caveat(r: Run, m: dict) -> str | None:
    """`share_kept_caveat` for model `m` of the run: None for the teacher and for a share the run does not define."""
    t = r.teacher
    if t is None or m is t or num(m.get("share_kept")) is None:
        return None
    correct, items = _teacher_items(r)
    return share_kept_caveat(correct, items, num(t.get("accuracy")), t.get("accuracy_ci"), m.get("share_kept_ci"))


def header(r: Run, nav: list[tuple[str, str]]) -> str:
    """The title band: run name, teacher and students, the benchmark and how it was decoded, links to the sections."""
    res = r.res
    students = ", ".join(f"<b>{e(m['name'])}</b>" for m in r.students) or "no student"
    dec = res.get("decoding") if isinstance(res.get("decoding"), dict) else {}
    decoding = ""
    if dec:
        temp, samples = num(dec.get("temperature")), dec.get("samples")
        bits = ["greedy answers", f"up to {count(dec.get('max_tokens'))} tokens" if dec.get("max_tokens") else ""]
        if isinstance(samples, int) and samples > 1:
            bits.append(f"{samples} more sampled per item" + (f" at temperature {temp:g}" if temp is not None else ""))
        decoding = " · " + e(", ".join(b for b in bits if b))
    links = "".join(f'<a href="#{sid}">{e(title)}</a>' for sid, title in nav)
    return f"""<header class="top"><div class="wrap">
<div class="kicker">stillhouse distillation report</div>
<h1>{e(r.name)}</h1>
<p class="subtitle">Teacher <code>{e(r.teacher_spec)}</code> → {students} · evaluated on
<code>{e(res.get('benchmark', 'n/a'))}</code>: {count(res.get('items'))} held-out items in {len(r.families)} task
families, {e(res.get('verifier', 'exact match'))}{decoding}</p>
<nav>{links}</nav></div></header>"""


def _card(cid: str, key: str, value: str, note: str = "", cls: str = "") -> str:
    """A headline card: a label, one big value, a note below (all already-safe HTML)."""
    return (f'<div class="card{" " + cls if cls else ""}" id="{cid}"><span class="k">{key}</span>{value}'
            f'{f"<span class={chr(34)}s{chr(34)}>{note}</span>" if note else ""}</div>')


def teacher_cost(r: Run) -> tuple[str, str]:
    """The teacher's spend as the headline shows it, and a note on what it means."""
    spend = num(r.cost().get("teacher_usd"))
    if r.teacher_local and not spend:  # evaluate prices no local model: its cost is compute, not an API bill
        return "$0 (local)", "no API bill: the teacher ran on local compute"
    if spend is None:
        return "n/a", "no price known for this teacher"
    return usd(spend), "at the teacher's price per token"


def headline(r: Run) -> str:
    """The numbers a reader wants first, as cards, and one sentence that says them."""
    t, s = r.teacher or {}, (r.students[0] if r.students else None)
    cards = []
    if s is not None:
        ci = interval(s.get("share_kept_ci"))
        ci_line = f"{r.confidence} CI {pct(ci[0])}–{pct(ci[1])}" if ci else "no confidence interval in this run"
        others = "".join(f"<br>{e(m['name'])}: " + ("not meaningful" if share_caveat(r, m) else pct(m.get('share_kept')))
                         for m in r.students[1:])
        caveat = share_caveat(r, s)
        if caveat:  # a warning in the number's place: the number would be read as the result
            cards.append(_card("share-kept", "share of the teacher kept", "<b>not meaningful</b>",
                               f"{e(caveat)}; compare the accuracies instead{others}", "big warnc"))
        else:
            cards.append(_card("share-kept", "share of the teacher kept", f"<b>{pct(s.get('share_kept'))}</b>",
                               f"{ci_line}<br>{e(s['name'])}'s accuracy ÷ the teacher's{others}", "big"))
    rows = "".join(f'<span class="row"><span>{e(m["name"])}</span><span>{pct(m.get("accuracy"))}</span></span>'
                   for m in r.models)
    cards.append(_card("accuracy", "held-out accuracy", f'<span class="list">{rows}</span>'))
    c = r.cost()
    cost, note = teacher_cost(r)
    usage = " · ".join(x for x in (f"{count(c['teacher_calls'])} calls" if c.get("teacher_calls") is not None else "",
                                   f"{count(c['teacher_tokens'])} tokens" if c.get("teacher_tokens") else "") if x)
    if c.get("judge_calls"):
        usage += f"<br>judge: {usd(c.get('judge_usd'))} · {count(c.get('judge_calls'))} calls"
    cards.append(_card("cost", "teacher cost", f"<b>{e(cost)}</b>", e(note) + (f"<br>{usage}" if usage else "")))
    sp, tp = num((s or {}).get("parameters")), num(t.get("parameters"))
    ratio = "ratio n/a"
    if sp and tp:
        ratio = f"{sp / tp:.2f}× the teacher" + (f" ({tp / sp:.1f}× smaller)" if sp < 0.95 * tp else "")
    cards.append(_card("params", "parameters", f"<b>{params(sp)}</b>", f"student · teacher {params(tp)}<br>{ratio}"))
    total = sum(r.timings.values())
    cards.append(_card("wall-time", "wall time", f"<b>{duration(total, short=True) if r.timings else 'n/a'}</b>",
                       f"{duration(total)}: the sum of {len(r.timings)} stages' wall times" if r.timings
                       else "no stage timings"))
    cards.append(_judge_card(r, s))
    return f'<section id="headline" class="headline"><div class="cards">{"".join(cards)}</div>{_summary(r)}</section>'


def _judge_card(r: Run, s: dict | None) -> str:
    j = r.judge
    if j is None:
        return _card("judge-verdict", "judge vs teacher", "<b>n/a</b>", "this run has no judge", "na")
    ok = j.get("trustworthy")
    flag = ('<span class="pill ok">trustworthy</span>' if ok is True else
            '<span class="pill bad">noise</span>' if ok is False else "")
    swap = f"swap consistency {pct(j.get('swap_consistency'))} {flag}"
    pair = r.pair(s["name"]) if s else None
    if pair is None:
        return _card("judge-verdict", "judge vs teacher", "<b>n/a</b>", f"no comparison of the student<br>{swap}",
                     "warnc" if ok is False else "")
    value = (f'<b class="wtl"><span class="w">{pct(pair.get("win"), 0)}</span> · <span class="t">'
             f'{pct(pair.get("tie"), 0)}</span> · <span class="l">{pct(pair.get("loss"), 0)}</span></b>')
    return _card("judge-verdict", "judge vs teacher", value,
                 f"win · tie · loss of {e(s['name'])} against the teacher<br>{swap}", "warnc" if ok is False else "")


def _summary(r: Run) -> str:
    """One plain sentence with the result, as a model card's first line would give it."""
    if not r.students or r.teacher is None:
        return ""
    s, t = r.students[0], r.teacher
    ci = interval(s.get("share_kept_ci"))
    ci_txt = f" ({r.confidence} CI {pct(ci[0])}–{pct(ci[1])})" if ci else ""
    sp, tp = num(s.get("parameters")), num(t.get("parameters"))
    size = f" with {tp / sp:.1f}× fewer parameters" if sp and tp and sp < 0.95 * tp else ""
    caveat = share_caveat(r, s)
    if num(s.get("share_kept")) is None or caveat:
        zero = ": with a teacher at zero, no share of it is defined" if num(t.get("accuracy")) == 0 else ""
        if caveat:
            zero = f" (no share of the teacher is given: {e(caveat)})"
        text = (f"<b>{e(s['name'])}</b> scores {pct(s.get('accuracy'))} against the teacher's "
                f"{pct(t.get('accuracy'))}{zero}")
    else:
        text = (f"<b>{e(s['name'])}</b> keeps <b>{pct(s.get('share_kept'))}</b>{ci_txt} of the teacher's verifiable "
                f"accuracy{size}: {pct(s.get('accuracy'))} against {pct(t.get('accuracy'))}")
    base = next((m for m in r.models if m.get("role") == "base"), None)
    if base is not None:
        text += f", from {pct(base.get('accuracy'))} for its base before distillation"
    text += "."
    pair = r.pair(s["name"])
    pref = preference(pair) if pair else None
    if pref:
        noise = (" — but the judge is below its swap-consistency bar, so read that as noise"
                 if (r.judge or {}).get("trustworthy") is False else "")
        text += (f" The judge puts it at {pct(pref[0], 0)} of parity with the teacher (win {pct(pair.get('win'), 0)}, "
                 f"tie {pct(pair.get('tie'), 0)}, loss {pct(pair.get('loss'), 0)}){noise}.")
    return f'<p class="summary">{text}</p>'


def relative_quality(r: Run) -> str:
    if not r.others:
        return ""
    conf = num(r.res.get("confidence")) or 0.95
    rows, table_rows, caveats = [], [], {}
    for m in r.others:
        share, share_ci = num(m.get("share_kept")), interval(m.get("share_kept_ci"))
        pair = r.pair(m["name"])
        pref = preference(pair, conf) if pair else None
        score = num((pair or {}).get("relative_score"))
        score_ci = interval((pair or {}).get("relative_score_ci"))
        caveat = share_caveat(r, m)
        if caveat:
            caveats[m["name"]] = caveat
        rows.append({"label": r.label(m), "color": r.colors[m["name"]],
                     "verifiable": (share, share_ci) if share is not None else None,
                     "verifiable_note": "share not meaningful (see the warning above)" if caveat else None,
                     "judged": pref if pair else None,
                     "score": (score, score_ci) if score is not None else None})
        table_rows.append(
            f"<tr>{td(e(m['name']), '')}{td(e(m.get('role', '?')), '')}"
            f"{td(pct_ci(m.get('accuracy'), m.get('accuracy_ci')))}"
            f"{td(pct_ci(share, share_ci) + (NOT_MEANINGFUL if caveat else ''))}"
            f"{td(pct_ci(pref[0], pref[1]) if pref else 'n/a')}{td(pct_ci(score, score_ci))}"
            f"{td(pct_ci(m.get('teacher_agreement'), m.get('teacher_agreement_ci')))}</tr>")
    if r.judge is None:
        judged = ("No judge ran in this recipe, so only the verifiable measure is drawn; add a judge to the "
                  "evaluate section to compare open-ended answers.")
    else:
        j = r.judge
        judged_fams = [f for f, t in (r.res.get("tasks") or {}).items() if isinstance(t, dict) and t.get("judged")]
        fams = f" on the judged task families ({e(', '.join(judged_fams))})" if judged_fams else ""
        rule = "; orders that disagree count as a tie" if "disagree count as a tie" in str(j.get("rule", "")) else ""
        judged = (f"<b>Judged</b>: the judge (<code>{e(j.get('spec', 'n/a'))}</code>) compared each model's answer "
                  f"with the teacher's{fams}, every pair in both orders (A/B and B/A){rule}. (win + ½ tie) ÷ 50%: "
                  f"100% means the judge cannot tell the model from the teacher, more means it prefers the model. The "
                  f"hollow bar is Vicuna's relative score, the sum of the model's 1–10 scores over the teacher's, "
                  f"shown for comparison with published numbers; it hides ties and "
                  f"leans on the judge's calibration. A judge means little unless its verdicts survive swapping the "
                  f"answers: this one kept its verdict <b>{pct(j.get('swap_consistency'))}</b> of the time (Zheng et "
                  f"al. 2023 found 65% for GPT-4); position and length biases are in the judge section. The "
                  + ("judged bars' intervals are the evaluate stage's bootstrap." if any(
                      interval(p.get("preference_ci")) for p in j.get("pairs") or [] if isinstance(p, dict)) else
                     "(win + ½ tie) intervals are a normal approximation over the judged items; the relative "
                     "score's is the evaluate stage's bootstrap."))
    ci_how = (f"{r.confidence} bootstrap intervals ({count(r.res.get('bootstrap_resamples'))} resamples of the items)"
              if r.res.get("bootstrap_resamples") else f"{r.confidence} confidence intervals where the run has them")
    cap = (f"<b>Teacher = 100%.</b> <b>Verifiable</b> (solid): the model's accuracy on the held-out benchmark "
           f"({count(r.res.get('items'))} items, checked by {e(r.res.get('verifier', 'exact match'))}) ÷ the "
           f"teacher's; "
           f"error bars are {ci_how}. {judged}")
    chart = charts.relative_quality(rows)
    body = (_share_warning(caveats) +
            f"<figure>{img(chart, 'chart-relative', 'share of the teacher kept by every model, verifiable and judged')}"
            f"<figcaption>{cap}</figcaption></figure>"
            + table(["model", "role", "accuracy", "share kept (verifiable)", "judged vs parity", "relative score",
                     "agrees with teacher"], table_rows, "relative-table", 2))
    return section("relative-quality", "How much of the teacher each model keeps", body)


NOT_MEANINGFUL = '<span class="sub">not meaningful</span>'


def _share_warning(caveats: dict[str, str]) -> str:
    """A banner saying which models' shares of the teacher are not meaningful, and why ("" when none)."""
    if not caveats:
        return ""
    reasons = list(dict.fromkeys(caveats.values()))
    if len(reasons) == 1:
        who = "every model's" if len(caveats) > 1 else f"{e(next(iter(caveats)))}'s"
        why = f"{who} share of the teacher kept is not meaningful: {e(reasons[0])}."
    else:
        why = "Shares of the teacher kept that are not meaningful: " + "; ".join(
            f"{e(name)}: {e(c)}" for name, c in caveats.items()) + "."
    return (f'<div class="banner warn" id="share-kept-warning"><b>{why[0].upper() + why[1:]}</b> The numbers stay in '
            "the table for the record; compare the models' accuracies instead.</div>")


def per_task(r: Run) -> str:
    fams = r.families
    if not fams or not r.models:
        return ""
    shown = [{**m, "label": r.label(m)} for m in r.models]
    chart = charts.per_task(shown, fams, r.colors)
    tasks = r.res.get("tasks") or {}
    has_tasks = isinstance(tasks, dict) and bool(tasks)
    head = (["family"] + (["items", "verifier (extractor)", "judged" if r.judge else "judgeable"] if has_tasks else [])
            + [m["name"] for m in r.models])
    rows = []
    for f in fams:
        t = tasks.get(f) if has_tasks and isinstance(tasks.get(f), dict) else {}
        cells = ""
        if has_tasks:
            how = e(t.get("verifier") or "n/a") + (f'<span class="sub">{e(t["extractor"])}</span>'
                                                  if t.get("extractor") else "")
            cells = td(count(t.get("items"))) + td(how, "") + td("yes" if t.get("judged") else "—", "")
        cells += "".join(td(pct_ci((m.get("accuracy_by_family") or {}).get(f),
                                   (m.get("accuracy_by_family_ci") or {}).get(f), 1, 0)) for m in r.models)
        rows.append(f"<tr>{td(e(f), '')}{cells}</tr>")
    pad = td("", "") * 3 if has_tasks else ""
    rows.append(f'<tr class="total">{td("<b>macro mean</b>", "")}{pad}'
                + "".join(td(f"<b>{pct(m.get('accuracy'))}</b>{ci_span(m.get('accuracy_ci'), 0)}") for m in r.models)
                + "</tr>")
    body = (f"<figure>{img(chart, 'chart-tasks', 'held-out accuracy per task family for every model')}"
            f"<figcaption>Held-out accuracy per task family; error bars: {r.confidence} confidence intervals where "
            f"the run has them. The macro mean over families is the accuracy the rest of the page uses."
            f"</figcaption></figure>"
            + table(head, rows, "task-table", text_cols=(2, 3) if has_tasks else ()))
    ks = sorted({k for m in r.models for k in (m.get("pass_at_k") or {})}, key=lambda k: (len(str(k)), str(k)))
    if ks:
        prow = [f"<tr>{td(e(m['name']), '')}" + "".join(td(pct((m.get('pass_at_k') or {}).get(k))) for k in ks)
                + "</tr>" for m in r.models]
        body += ("<h3>pass@k</h3><p class=\"note\">The chance that at least one of k sampled answers is right "
                 "(unbiased estimator over the samples drawn per item).</p>"
                 + table(["model"] + [f"pass@{k}" for k in ks], prow, "pass-at-k", compact=True))
    root = str(r.run.root.resolve()) + "/"
    mrows = [f"<tr>{td(e(m['name']), '')}{td(e(m.get('role', '?')), '')}"
             f"{td('<code>' + e(str(m.get('spec', 'n/a')).replace(root, '')) + '</code>', 'spec')}"
             f"{td(params(m.get('parameters')))}{td(pct_ci(m.get('accuracy'), m.get('accuracy_ci')))}"
             f"{td(pct_ci(m.get('teacher_agreement'), m.get('teacher_agreement_ci')))}"
             f"{td(count(round(m['mean_answer_chars'])) if num(m.get('mean_answer_chars')) is not None else 'n/a')}"
             f"{td(duration(m.get('seconds')))}</tr>" for m in r.models]
    body += ("<h3>Models in this run</h3>"
             + table(["model", "role", "spec", "parameters", "accuracy", "agrees with teacher", "mean answer (chars)",
                      "eval time"], mrows, "models", 3))
    return section("per-task", "Accuracy per task", body)


def cost_quality(r: Run) -> str:
    t = r.teacher
    if t is None:
        return ""
    by_size = [{"x": num(m.get("parameters")), "y": 1.0 if m is t else num(m.get("share_kept")),
                "ci": None if m is t else interval(m.get("share_kept_ci")), "label": m["name"],
                "color": r.colors[m["name"]]} for m in r.models]
    noisy = {m["name"] for m in r.models if share_caveat(r, m)}  # a share too noisy to plot as a result
    by_size = [p for p in by_size if p["x"] and p["y"] is not None and p["label"] not in noisy]
    by_train = [{"x": r.train_seconds(m), "y": num(m.get("share_kept")), "ci": interval(m.get("share_kept_ci")),
                 "label": m["name"], "color": r.colors[m["name"]]} for m in r.students]
    by_train = [p for p in by_train if p["x"] is not None and p["y"] is not None and p["label"] not in noisy]
    c = r.cost()
    spend = num(c.get("teacher_usd"))
    tp = num(t.get("parameters"))
    crow = [f"<tr>{td('teacher (generation)', '')}{td(e(teacher_cost(r)[0]))}{td(count(c.get('teacher_calls')))}"
            f"{td(count(c.get('teacher_tokens')))}</tr>"]
    if r.judge is not None or c.get("judge_calls"):
        crow.append(f"<tr>{td('judge', '')}{td(usd(c.get('judge_usd')))}{td(count(c.get('judge_calls')))}"
                    f"{td('n/a')}</tr>")
    trained = r.manifests.get("train", {}).get("counts", {}).get("students") or {}
    srows = []
    for m in r.students:
        sp = num(m.get("parameters"))
        share = num(m.get("share_kept"))
        per_usd = f"{100 * share / spend:,.1f}% per $" if share is not None and spend and m["name"] not in noisy \
            else "n/a"
        tr = trained.get(m["name"], {}) if isinstance(trained, dict) else {}
        loss = num(tr.get("final_loss"))
        srows.append(f"<tr>{td(e(m['name']), '')}{td(params(sp))}{td(f'{sp / tp:.2f}×' if sp and tp else 'n/a')}"
                     f"{td(duration(r.train_seconds(m)))}{td(count(tr.get('steps')))}"
                     f"{td('n/a' if loss is None else f'{loss:.4f}')}"
                     f"{td(pct_ci(share, m.get('share_kept_ci')) + (NOT_MEANINGFUL if m['name'] in noisy else ''))}"
                     f"{td(per_usd)}</tr>")
    body = ""
    if by_size:
        chart = charts.cost_quality(by_size, by_train)
        body += (f"<figure>{img(chart, 'chart-cost', 'share of the teacher kept against size and training time')}"
                 f"<figcaption>Share of the teacher kept against parameters (every model with a known size; log scale)"
                 + (" and against training time (each student)" if by_train else "")
                 + f"; the dashed line is the teacher. Error bars: {r.confidence} intervals."
                 + (f" Left out, their share not meaningful (see the warning above): {e(', '.join(sorted(noisy)))}."
                    if noisy else "") + "</figcaption></figure>")
    body += "<h3>Spend</h3>" + table(["", "cost (USD)", "calls", "tokens"], crow, "cost-table", compact=True)
    if srows:
        body += "<h3>Students</h3>" + table(["student", "parameters", "× teacher", "training time", "steps",
                                             "final loss", "share kept", "share kept per $"], srows, "train-table")
        kd = [(name, tr["kd"]) for name, tr in (trained.items() if isinstance(trained, dict) else [])
              if isinstance(tr, dict) and isinstance(tr.get("kd"), dict)]
        for name, k in kd:
            body += (f'<p class="kd-note">{e(name)}: logit distillation towards the teacher\'s logprobs on '
                     f"{count(k.get('samples_aligned'))} of {count(k.get('samples'))} samples "
                     f"({count(k.get('tokens_with_teacher_distribution'))} answer tokens); the others "
                     "(no logprobs, or an answer curation rewrote) were learned from their text alone.</p>")
    return section("cost-quality", "Cost against quality", body)


def judge(r: Run) -> str:
    j = r.judge
    if j is None:
        return section("judge", "Judge", '<p class="na">n/a: this run has no judge (the recipe names none, or the '
                       "evaluation predates judging). The verifiable benchmark above is the whole evaluation.</p>")
    sc, threshold = num(j.get("swap_consistency")), num(j.get("threshold")) or SWAP_THRESHOLD
    fp = num(j.get("first_position_share"))
    acc = num(j.get("accuracy_on_verifiable"))
    banner = ""
    if j.get("trustworthy") is False:
        banner = (f'<div class="banner bad" id="judge-warning"><b>Below {pct(threshold, 0)} swap consistency: '
                  f"treat these verdicts as noise.</b> The judge kept its verdict when the two answers swapped "
                  f"places only {pct(sc)} of the time, so its preferences say more about answer order than about the "
                  f"answers."
                  f"</div>")
    elif j.get("trustworthy") is True:
        banner = (f'<div class="banner ok" id="judge-ok">Swap consistency {pct(sc)}, above the {pct(threshold, 0)} '
                  f"bar: the judge's verdicts mostly survive swapping the answers' order.</div>")
    same = j.get("same_as_teacher") is True or str(j.get("spec", "")) in ("teacher", r.teacher_spec)
    template = str(j.get("template") or "")
    long_template = "\n" in template or len(template) > 60
    stats = [("judge", f"<code>{e(j.get('spec', 'n/a'))}</code>" + (" (the teacher itself)" if same else "")
              + (f"<br>prompt: {e(template)}" if template and not long_template else "")),
             ("swap consistency", f"<b>{pct(sc)}</b> (bar: {pct(threshold, 0)}; GPT-4 in Zheng et al. 2023: 65%)"),
             ("first-position share",
              f"<b>{pct(fp)}</b> of the decisive verdicts pick the answer shown first (50%: no position bias)"),
             ("accuracy on verifiable pairs",
              f"<b>{pct(acc)}</b> over {count(j.get('verifiable_pairs'))} pairs where one answer is right and the "
              f"other wrong" if acc is not None else "n/a")]
    dl = "".join(f"<div><dt>{e(k)}</dt><dd>{v}</dd></div>" for k, v in stats)
    pairs = [p for p in j.get("pairs") or [] if isinstance(p, dict)]
    rows, chart_rows = [], []
    for p in pairs:
        pref = preference(p, num(r.res.get("confidence")) or 0.95)
        chars = p.get("mean_chars") or {}
        against = str(p.get("against", "teacher"))
        who = e(p.get("model", "?")) + ("" if against == "teacher" else f' <span class="sub">vs {e(against)}</span>')
        rows.append(f"<tr>{td(who, '')}{td(count(p.get('items')))}"
                    + "".join(td(pct_ci(p.get(k), p.get(f"{k}_ci"), 1, 0)) for k in ("win", "tie", "loss"))
                    + f"{td(pct_ci(pref[0], pref[1], 1, 0) if pref else 'n/a')}{td(pct(p.get('swap_consistency')))}"
                    f"{td(pct_ci(p.get('relative_score'), p.get('relative_score_ci'), 1, 0))}"
                    f"{td(_chars(chars.get('model')) + ' / ' + _chars(chars.get('against')))}</tr>")
        chart_rows.append({"label": str(p.get("model", "?")), "win": num(p.get("win")), "tie": num(p.get("tie")),
                           "loss": num(p.get("loss"))})
    body = banner + f'<dl class="stats">{dl}</dl>'
    if chart_rows:
        chart = charts.judge_outcomes(chart_rows)
        body += (f"<figure>{img(chart, 'chart-judge', 'judge verdicts against the teacher: win, tie, loss')}"
                 f"<figcaption>Each model's answers judged against the teacher's, both orders; the dotted line is "
                 f"parity (50%).</figcaption></figure>")
    body += table(["model", "items", "win", "tie", "loss", "judged vs parity", "swap consistency",
                   "relative score", "mean chars: model / teacher"], rows, "judge-table")
    caveats = ["<b>Position</b>: every pair is judged in both orders; a first-position share far from 50% means the "
               "judge favours a slot, and swap consistency says how often it changed its mind with the slot.",
               "<b>Length</b>: judges tend to prefer longer answers; compare the mean lengths beside the verdicts "
               "before reading a win as quality.",
               "<b>Relative score</b> (Vicuna's \"90% of ChatGPT\" measure): "
               + (e(j["relative_score_caveats"]) if isinstance(j.get("relative_score_caveats"), str) else
                  "the sum of the model's 1–10 scores over the teacher's. It depends on how the judge spreads its "
                  "scores and hides ties; the win/tie/loss rates are the better summary.")]
    if isinstance(j.get("unreadable_verdicts"), int) and j["unreadable_verdicts"]:
        caveats.append(f"<b>Unreadable</b>: {count(j['unreadable_verdicts'])} of the judge's replies had no verdict "
                       "the parser could read.")
    if same:
        caveats.append("<b>Self-preference</b>: the judge is the teacher itself, and models tend to rate their own "
                       "answers higher; a win against it counts for more than a loss.")
    body += "<ul class=\"caveats\">" + "".join(f"<li>{c}</li>" for c in caveats) + "</ul>"
    if long_template:
        body += f"<details><summary>judge prompt template</summary><pre>{e(template)}</pre></details>"
    return section("judge", "Judge: pairwise verdicts against the teacher", body)


def _int(x) -> int:
    return int(x) if num(x) is not None else 0


def _chars(x) -> str:
    v = num(x)
    return "n/a" if v is None else f"{v:,.0f}"


def identity(r: Run) -> str:
    """Who each model says it is, when asked: the teacher's identity, its own, another vendor's, or none."""
    rows = []
    for m in r.models:
        for where, c in (m.get("identity_claims") or {}).items():
            if not isinstance(c, dict):
                continue
            rows.append(f"<tr>{td(e(m['name']), '')}{td(e(str(where).replace('_', ' ')), '')}"
                        f"{td(count(c.get('items')))}"
                        + "".join(td(pct(c.get(k))) for k in ("reference", "own", "other", "none")) + "</tr>")
    if not rows:
        return ""
    lead = ("Identity questions (the benchmark's, and new phrasings never trained on), each answer classified by the "
            "identity it claims. A student distilled without scrubbing answers as its teacher.")
    return section("identity", "Identity: who the models say they are",
                   table(["model", "questions", "n", "claims the teacher's", "its own", "another vendor's", "none"],
                         rows, "identity-claims", 2), lead)


def curation_totals(c: dict) -> tuple[int | None, int]:
    """(dropped, added) over the whole curation: the filters' own counts summed where the manifest lists them (an
    older manifest's `dropped` was generated - kept, negative when a filter added rows), else its totals."""
    filters = [f for f in c.get("filters") or [] if isinstance(f, dict)]
    if filters:
        return sum(_int(f.get("dropped")) for f in filters), sum(_int(f.get("added")) for f in filters)
    d = num(c.get("dropped"))
    return (None if d is None else max(0, int(d))), _int(c.get("added"))


def data_story(r: Run) -> str:
    """Samples generated, dropped or rewritten by each curation filter, kept; a warning for a contaminated benchmark."""
    cur = r.manifests.get("curate")
    gen = r.manifests.get("generate", {}).get("counts", {})
    if not cur and not gen:
        return ""
    c = (cur or {}).get("counts") or {}
    filters = [f for f in c.get("filters") or [] if isinstance(f, dict)]
    body = ""
    if c:
        card = (' Dataset card: <a href="data/README.md"><code>data/README.md</code></a>.'
                if (r.run.root / "data" / "README.md").is_file() else "")
        dropped, added = curation_totals(c)
        body += (f'<p class="lead"><b>{count(c.get("generated"))}</b> samples generated, <b>{count(c.get("kept"))}</b> '
                 f'kept for training (<b>{count(dropped)}</b> dropped'
                 + (f', <b>{count(added)}</b> added by curation' if added else "") + f').{card}</p>')
    cols = []
    if gen:
        tokens = (gen.get("prompt_tokens") or 0) + (gen.get("completion_tokens") or 0)
        grow = [("method", e(gen.get("method", "n/a"))), ("prompts", count(gen.get("prompts"))),
                ("samples generated", count(gen.get("samples"))),
                ("truncated at max_tokens", count(gen.get("truncated"))),
                ("teacher tokens (prompt + completion)", count(tokens) if tokens else "n/a"),
                ("calls made / from the cache", f"{count(gen.get('calls_made'))} / {count(gen.get('cache_hits'))}")]
        cols.append("<h3>Generation</h3>"
                    + table(None, [f"<tr>{td(k, '')}{td(v)}</tr>" for k, v in grow], "generation"))
    if filters:
        steps = [("generated", _int(c.get("generated")), 0, 0)] + [
            (str(f.get("filter", "?")), _int(f.get("kept")), _int(f.get("dropped")), _int(f.get("added")))
            for f in filters]
        cols.append("<h3>Curation</h3>" + img(charts.funnel(steps), "chart-data",
                                               "samples kept and dropped by each curation filter"))
    if cols:
        body += '<div class="two">' + "".join(f"<div>{x}</div>" for x in cols) + "</div>"
    if c.get("contaminated_eval_items"):
        sets = ", ".join(f"{e(k)}: {count(v)}" for k, v in (c.get("contaminated_sets") or {}).items())
        body += (f'<div class="banner warn" id="contamination">Warning: {count(c["contaminated_eval_items"])} '
                 f"evaluation item(s) also appear in the generated data ({sets}; n-gram overlap). The samples were "
                 "dropped, but a benchmark whose items were in the teacher's prompt set measures less than it "
                 "seems.</div>")

    def why(f: dict) -> str:
        reasons = {**(f.get("drop_reasons") or {}), **(f.get("change_reasons") or {})}
        return e(", ".join(f"{k}: {v}" for k, v in reasons.items()))

    if filters:
        rows = [f"<tr>{td(e(f.get('filter', '?')), '')}{td(count(f.get('in')))}{td(count(f.get('kept')))}"
                f"{td(count(f.get('dropped')))}{td(count(f.get('added', 0)))}{td(count(f.get('changed')))}"
                f"{td(why(f), 'why')}</tr>" for f in filters]
        body += table(["filter", "in", "kept", "dropped", "added", "rewritten", "reasons"], rows, "filters",
                      text_cols=(6,))
    return section("data", "Data: generated, curated, kept", body)


def stage_timings(r: Run) -> str:
    if not r.timings:
        return ""
    stages = list(r.timings.items())
    chart = charts.timings(stages)
    total = sum(s for _, s in stages) or 1.0
    started = {m: num(r.manifests.get(m, {}).get("started")) for m, _ in stages}
    def when(name: str) -> str:
        t = started[name]
        return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "n/a"

    rows = [f"<tr>{td(e(name), '')}{td(when(name))}{td(duration(s))}{td(f'{100 * s / total:.0f}%')}</tr>"
            for name, s in stages]
    rows.append(f'<tr class="total">{td("<b>total</b>", "")}{td("")}{td(f"<b>{duration(total)}</b>")}{td("100%")}</tr>')
    body = (f'<div class="two wide-left"><div>{img(chart, "chart-timings", "wall time of each stage")}</div>'
            f'<div>{table(["stage", "started", "wall time", "share"], rows, "timings-table")}</div></div>'
            '<p class="note">A stage skipped because it had already finished keeps the timing of the run that did '
            "it.</p>")
    return section("timings", "Stage timings", body)


def links(r: Run) -> str:
    root = r.run.root
    items = [("dataset card", "data/README.md"), ("student model card", "student/README.md")]
    items += [(f"model card: {p.parent.name}", str(p.relative_to(root)))
              for p in sorted(root.glob("students/*/README.md"))]
    items += [("evaluation results", "eval/results.json"), ("per-item answers and verdicts", "eval/samples.jsonl"),
              ("call ledger (SQLite)", "ledger.db"), ("the recipe as run", "recipe.yaml"),
              ("generated data", "data/generated.parquet"), ("curated data", "data/curated.parquet")]
    items += [("audit evidence", "audit/evidence.json"), ("audit summary", "audit/summary.json")]
    items += [(f"audit evidence: {p.parent.name}", str(p.relative_to(root)))
              for p in sorted(root.glob("audit/*/evidence.json"))]
    lis = [f'<li><a href="{quote(rel)}">{e(label)}</a> <code>{e(rel)}</code></li>' for label, rel in items
           if (root / rel).is_file()]
    if not lis:
        return ""
    return section("links", "Files", f'<ul class="links">{"".join(lis)}</ul>',
                   "Everything on this page is computed from these files, in the run directory beside this page.")
