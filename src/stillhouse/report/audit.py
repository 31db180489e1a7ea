"""The report's audit section: a summary row per suspect, then each test's evidence.

Drawn from the audit stage's files alone (`audit/summary.json`, `audit/*/evidence.json`, or one
`audit/evidence.json` from `stillhouse audit`), read defensively: an audit from an older version, or
one that ran only some tests, shows what it has.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from stillhouse.report.fmt import count, e, num, p_value, pct, section, table, td
from stillhouse.report.runfiles import Run


def audit(r: Run) -> str:
    """Each audit's evidence (runs/NAME/audit/evidence.json, or one per suspect under audit/*/), read defensively."""
    root = r.run.root / "audit"
    order = {m["name"]: i for i, m in enumerate(r.models)}  # students first, as everywhere on the page
    found = [p for p in [root / "evidence.json", *sorted(root.glob("*/evidence.json"),
                                                          key=lambda p: (order.get(p.parent.name, 99), p.parent.name))]
             if p.is_file()]
    parts = []
    for path in found:
        try:
            ev = json.loads(path.read_text())
        except (OSError, ValueError):
            parts.append(f'<p class="na">{e(path.relative_to(r.run.root))}: unreadable</p>')
            continue
        if isinstance(ev, dict):
            parts.append(_evidence(ev, path.relative_to(r.run.root), r.run.root.resolve()))
    if not parts:
        return ""
    parts.insert(0, _audit_summary(root / "summary.json"))
    lead = ("Was a model distilled from the teacher? Each test gives a p-value for its own null (provenance: the "
            "suspect answers no more like the teacher than like the closest of a pool of unrelated models; identity: "
            "it claims the teacher's identity no more often than they do; watermark: its text does not depend on the "
            "teacher's key). The verdict rejects at level α by Holm's method: if those nulls hold, the chance of "
            "calling the model distilled is at most α. A distilled verdict is a finding, not a failure of the run; "
            "no evidence is not proof of innocence.")
    return section("audit", "Audit: distillation evidence", "".join(parts), lead)


def _audit_summary(path: Path) -> str:
    """One row per audited suspect (audit/summary.json, written by the audit stage): verdict, each test's p-value,
    and whom attribution names; the per-suspect evidence follows it."""
    try:
        doc = json.loads(path.read_text())
        rows_in = [r for r in doc.get("suspects", []) if isinstance(r, dict)]
    except (OSError, ValueError, AttributeError):
        return ""
    if not rows_in:
        return ""
    tests = list(dict.fromkeys(t for r in rows_in for t in (r.get("p_values") or {})))
    rows = []
    for r in rows_in:
        pv = r.get("p_values") or {}
        probs = r.get("attribution") or {}
        who = r.get("likeliest")
        attr = f"{e(who)} ({pct(probs.get(who))})" if who else "n/a"
        cls = "finding" if r.get("distilled") else "plain" if r.get("distilled") is False else ""
        carried = f" <small>by {e(r['deciding_test'])}</small>" if r.get("distilled") and r.get("deciding_test") else ""
        verdict = f'<span class="pill {cls}">{e(r.get("verdict") or "n/a")}</span>{carried}'
        cells = "".join(td(p_value(pv.get(t))) for t in tests)
        rows.append(f"<tr>{td(e(r.get('suspect', '?')), '')}{td(verdict, '')}{cells}{td(attr, '')}</tr>")
    ref = doc.get("reference") or {}
    who = f"{e(ref.get('name', '?'))} ({e(ref.get('maker', '?'))})" if ref else "the teacher"
    head = ["suspect", f"verdict against {ref.get('name', 'the teacher')}"] + [f"p: {t}" for t in tests] + \
        ["attribution: reads like"]
    return (f"<p>Suspects audited against {who}, each test's p-value, and the verdict at α = "
            f"{p_value(doc.get('alpha'))} (Holm).</p>" + table(head, rows, "audit-summary", 2, text_cols=(len(head) - 1,)))


def _evidence(ev: dict, rel: Path, r_root: Path) -> str:
    v = ev.get("verdict") if isinstance(ev.get("verdict"), dict) else {}
    vt = v.get("tests") if isinstance(v.get("tests"), dict) else {}
    rows = []
    for name, t in (ev.get("tests") or {}).items():
        if not isinstance(t, dict):
            continue
        stat = _statistic(name, t)
        h = vt.get(name) or {}
        rej = h.get("rejects")
        verdict = "yes" if rej else "no" if rej is False else "n/a"
        rows.append(f"<tr>{td(e(name), '')}{td(stat, 'stat')}{td(p_value(t.get('p_value')))}"
                    f"{td(p_value(h.get('holm_adjusted')))}{td(verdict)}</tr>")
    name = rel.parent.name if rel.parent.name != "audit" else None  # audit/<suspect>/evidence.json
    spec = str(ev.get("suspect", "?")).replace(str(r_root) + "/", "")
    html_ = (f'<h3>Suspect {e(name) + " " if name else ""}<code>{e(spec)}</code> '
             f'<a class="file" href="{quote(str(rel))}">{e(rel)}</a></h3>')
    if v:
        alpha = v.get("alpha", v.get("false_positive_rate_at_most"))
        cls = "finding" if v.get("distilled") else "plain"
        fisher = f" Fisher's combined p-value (assumes independent tests): {p_value(v.get('fisher_p_value'))}." \
            if v.get("fisher_p_value") is not None else ""
        why = (f"carried by <b>{e(v.get('deciding_test', 'n/a'))}</b>" if v.get("distilled")
               else f"closest to rejecting: {e(v.get('deciding_test', 'n/a'))}")
        guarantee = e(v["guarantee"]) + "." if v.get("guarantee") else \
            f"false-positive rate at most {p_value(alpha)} ({e(v.get('method', 'holm'))})."
        html_ += (f'<div class="banner {cls} verdict"><b>{e(v.get("verdict", "n/a"))}</b> at α = {p_value(alpha)}, '
                  f"{why}. {guarantee}{fisher}</div>")
    else:
        html_ += '<p class="na">No verdict (no test gave a p-value).</p>'
    if rows:
        html_ += table(["test", "statistic", "p-value", "Holm-adjusted", "rejects"], rows, None, 2)
    prov = (ev.get("tests") or {}).get("provenance")
    if isinstance(prov, dict):
        html_ += _provenance(prov)
    notes = []
    for name, rep in (ev.get("reported") or {}).items():
        if isinstance(rep, dict) and "likeliest" in rep:
            probs = ", ".join(f"{e(k)} {pct(p)}" for k, p in (rep.get("probability") or {}).items())
            notes.append(f"<li><b>{e(name)}</b> (no p-value): reads most like <b>{e(rep.get('likeliest'))}</b> "
                         f"({probs}); classifier cross-validated accuracy {pct(rep.get('cv_accuracy'))} against chance "
                         f"{pct(rep.get('chance'))}.</li>")
        else:
            notes.append(f"<li><b>{e(name)}</b>: {e(rep if isinstance(rep, str) else json.dumps(rep)[:300])}</li>")
    if notes:
        html_ += '<ul class="caveats">' + "".join(notes) + "</ul>"
    return f'<div class="evidence">{html_}</div>'


def _statistic(name: str, t: dict) -> str:
    """The test's own statistic, in words."""
    if "claims_reference" in t:
        if "questions" in t:  # counted by question, against a measured or a stated null
            return (f"{count(t.get('claims_reference'))} of {count(t.get('questions'))} questions claim the "
                    f"reference's identity (in any of their wrappers; {count(t.get('claims_reference_answers'))} of "
                    f"{count(t.get('probes'))} answers); null {e(t.get('null', ''))}")
        return (f"{count(t.get('claims_reference'))} of {count(t.get('probes'))} probe answers claim the reference's "
                f"identity (null rate {pct(t.get('null_rate'))})")
    if "closest" in t and isinstance(t.get("test"), dict):
        tt = t["test"]
        return (f"closer to the reference than to {e(t['closest'])} (the closest pool model) on "
                f"{count(tt.get('closer_to_reference'))} of {count(tt.get('prompts'))} held-out prompts, closer to "
                f"{e(t['closest'])} on {count(tt.get('closer_to_other'))}; exact sign test")
    key = t.get("key") if isinstance(t.get("key"), dict) else None
    if key is not None:
        z = num(key.get("z"))
        emp = t.get("empirical_p")
        text = (f"{count(key.get('green'))} of {count(key.get('scored'))} scored tokens green (γ = "
                f"{num(key.get('gamma')) or 0:.3f}), z = {'n/a' if z is None else f'{z:.2f}'}")
        if emp is not None:
            text += f"; empirical p over {count(t.get('null_keys'))} random keys {p_value(emp)}"
        fpr = t.get("false_positive_rate")
        if isinstance(fpr, dict) and fpr:
            rates = ", ".join(f"{pct(v)} at p ≤ {e(k)}" for k, v in fpr.items() if num(v) is not None)
            text += f"; random keys' false-positive rate {rates}" if rates else ""
        return text
    if "green_mass" in t:  # white-box: the suspect's own next-token distributions
        z, emp = num(t.get("z")), t.get("empirical_p")
        text = (f"white-box: green probability mass {num(t.get('green_mass')) or 0:.3f} against "
                f"{num(t.get('expected')) or 0:.3f} by chance over {count(t.get('contexts'))} contexts, "
                f"z = {'n/a' if z is None else f'{z:.2f}'}")
        if emp is not None:
            text += f"; empirical p over {count(t.get('null_keys'))} random keys {p_value(emp)}"
        return text
    if "statistic" in t:
        return e(t["statistic"])
    return "n/a"


def _provenance(t: dict) -> str:
    """The provenance evidence: the suspect's mean ROUGE-L with the reference against each pool model on the
    held-out half, and which pool models were left out as not competent on the prompts."""
    tests = t.get("pool") if isinstance(t.get("pool"), dict) else {}
    holm = t.get("holm") or {}
    rows = []
    for name, tt in tests.items():
        if not isinstance(tt, dict):
            continue
        mark = " (closest, chosen on the other half)" if name == t.get("closest") else ""
        sims = "".join(td(f"{x:.3f}" if isinstance(x, (int, float)) else "n/a")
                       for x in (tt.get("mean_similarity_reference"), tt.get("mean_similarity_other")))
        rows.append(f"<tr>{td(e(name) + mark, '')}{sims}"
                    f"{td(count(tt.get('closer_to_reference')))}{td(count(tt.get('closer_to_other')))}"
                    f"{td(count(tt.get('ties')))}{td(p_value(tt.get('p_value')))}{td(p_value(holm.get(name)))}</tr>")
    if not rows:
        return ""
    halves = t.get("halves") or [None, None]
    refused = t.get("refused") or []
    note = (f"<p>Provenance: the suspect's answers to {count(halves[1])} held-out prompts (the pool model to beat was "
            f"chosen on the other {count(halves[0])}), each compared by ROUGE-L with the reference's answer and each "
            f"pool model's answer to the same prompt.</p>")
    if refused:
        note += f"<p class=\"na\">Left out as not competent on the prompts: {e(', '.join(refused))}.</p>"
    return note + table(["pool model", "ROUGE-L with reference", "ROUGE-L with it", "closer to reference",
                         "closer to it", "ties", "p-value", "Holm over the pool"], rows, "provenance", 1)

