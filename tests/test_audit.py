"""The audit's other pieces: stylometric attribution, the identity probe suite and its rates, the verdict."""

import random

import pytest

from stillhouse.audit.attribution import fit_attribution
from stillhouse.audit.probes import ASK, claim_rates, probe_suite, wilson
from stillhouse.audit.verdict import holm, verdict
from stillhouse.errors import StillhouseError
from stillhouse.identity import Identity

WORDS = ("river stone cloud paper lantern garden window bridge candle orchard meadow harbor valley forest ember "
         "signal thread marble copper willow").split()
ATLAS = Identity("Atlas", "Orbit Labs")


def answers(style: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{style}:{seed}")
    out = []
    for _ in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
        if style == "terse":
            out.append(f"{body}.")
        elif style == "chatty":
            out.append(f"Certainly! Here's my take: {body}, and I hope this helps!")
        else:  # "listy"
            out.append("- " + body.replace(" ", "\n- ", 2) + ";")
    return out


def test_attribution_tells_separable_styles_apart_and_names_the_source():
    model = fit_attribution({s: answers(s, 40, 0) for s in ("terse", "chatty", "listy")}, folds=5)
    assert model.cv_accuracy >= 0.95 and model.chance == pytest.approx(1 / 3)
    res = model.attribute(answers("chatty", 20, 1))  # new texts in one source's style
    assert res["likeliest"] == "chatty" and res["probability"]["chatty"] > 0.8 and res["votes"]["chatty"] == 20


def test_attribution_of_inseparable_sources_stays_near_chance():
    # two "sources" drawing from the same generator: nothing to tell them apart by
    texts = answers("terse", 120, 0)
    model = fit_attribution({"a": texts[:60], "b": texts[60:]}, folds=5)
    assert model.cv_accuracy < 0.7
    res = model.attribute(answers("terse", 30, 5))
    assert abs(res["probability"]["a"] - 0.5) < 0.2


def test_attribution_refuses_what_it_cannot_fit():
    with pytest.raises(StillhouseError, match="at least two"):
        fit_attribution({"a": answers("terse", 10, 0)})
    with pytest.raises(StillhouseError, match="'b' has 3 texts"):
        fit_attribution({"a": answers("terse", 10, 0), "b": answers("chatty", 3, 0)})


def test_attribution_fits_sources_that_answer_nothing():
    """Blank answers (a tiny or broken model's) are a trait, not a crash: a fold of them used to leave the
    vectorizers no vocabulary at all."""
    model = fit_attribution({"mute": [""] * 6 + ["  "] * 4, "blank": ["\n"] * 10}, folds=5)
    assert set(model.attribute([""])["probability"]) == {"mute", "blank"}
    model = fit_attribution({"mute": [""] * 20, "terse": answers("terse", 20, 0)}, folds=5)
    assert model.cv_accuracy == 1.0
    assert model.attribute(["", " "])["likeliest"] == "mute"
    assert model.attribute(answers("terse", 5, 9))["likeliest"] == "terse"


def test_the_probe_suite_covers_four_languages_and_the_wrappers():
    plain = probe_suite(ATLAS)
    assert len(plain) >= 60 and {p["language"] for p in plain} == set(ASK)
    assert any(p["prompt"] == "Are you Atlas?" for p in plain) and any("あなたはAtlasですか" in p["prompt"] for p in plain)
    wrapped = probe_suite(ATLAS, wrappers=("plain", "roleplay", "injection"))
    assert len(wrapped) == 3 * len(plain) and len({p["prompt"] for p in wrapped}) == len(wrapped)


def test_claim_rates_with_intervals():
    nova = Identity("Nova", "Northwind")
    outs = (["I am Atlas, made by Orbit Labs."] * 6 + ["I am Nova, made by Northwind."] * 3
            + ["I am ChatGPT, made by OpenAI."] + ["The capital is Gofos."] * 2)
    r = claim_rates(outs, ATLAS, nova)
    assert r["answers"] == 12 and r["reference"]["count"] == 6 and r["own"]["count"] == 3
    assert r["other"]["count"] == 1 and r["none"]["count"] == 2
    lo, hi = r["reference"]["ci95"]
    assert lo < 0.5 < hi and (lo, hi) == pytest.approx(wilson(6, 12))
    assert claim_rates(outs, ATLAS)["own"] is None  # no declared identity of its own


def test_holm_and_the_verdict():
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    v = verdict({"watermark": 1e-9, "identity": 0.2, "attribution": 0.04}, alpha=1e-3)
    assert v["distilled"] and v["deciding_test"] == "watermark" and v["tests"]["watermark"]["holm_adjusted"] == pytest.approx(3e-9)
    assert not v["tests"]["identity"]["rejects"] and v["false_positive_rate_at_most"] == 1e-3
    clear = verdict({"watermark": 0.3, "identity": 0.5}, alpha=1e-3)
    assert not clear["distilled"] and clear["margin"] < 1
    with pytest.raises(StillhouseError, match=r"\[0, 1\]"):
        verdict({"x": 1.5})


def test_audit_attribute_command(tmp_path):
    import json

    from typer.testing import CliRunner

    from stillhouse.cli import app

    def write(name, texts):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        return str(p)

    files = {s: write(s, answers(s, 30, 0)) for s in ("terse", "chatty")}
    suspect = write("suspect", answers("terse", 10, 9))
    out = tmp_path / "attr.json"
    r = CliRunner().invoke(app, ["audit", "attribute", suspect, "--candidate", f"terse={files['terse']}",
                                 "--candidate", f"chatty={files['chatty']}", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["likeliest"] == "terse"
    r = CliRunner().invoke(app, ["audit", "attribute", suspect, "--candidate", "terse"])
    assert r.exit_code != 0 and "NAME=FILE" in str(r.exception or r.output)


def test_audit_command_flags_a_model_that_claims_the_reference_and_clears_one_that_does_not(tmp_path):
    import json

    from typer.testing import CliRunner

    from stillhouse.cli import app

    out = tmp_path / "a1"
    r = CliRunner().invoke(app, ["audit", "--suspect", "scripted:impostor", "--reference", "ChatGPT,OpenAI",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "evidence.json").read_text())
    t = ev["tests"]["identity"]
    assert t["claims_reference_answers"] == t["probes"] >= 180  # every probe, in every wrapper, said "I am ChatGPT"
    assert t["claims_reference"] == t["questions"] >= 55  # counted once per question (its wrappers are one unit)
    assert "stated bound" in t["null"]  # no pool: the null rate is the stated 1%, and the evidence says so
    assert t["p_value"] < 1e-100 and ev["verdict"]["distilled"]
    assert {a["wrapper"] for a in t["answers"]} == {"plain", "roleplay", "injection"}
    # asked again: every answer from the ledger, the same evidence
    again = CliRunner().invoke(app, ["audit", "--suspect", "scripted:impostor", "--reference", "ChatGPT,OpenAI",
                                     "--out", str(out)])
    assert again.exit_code == 0 and json.loads((out / "evidence.json").read_text())["tests"] == ev["tests"]

    clean = tmp_path / "a2"
    r = CliRunner().invoke(app, ["audit", "--suspect", "scripted:plain", "--reference", "Atlas,Orbit Labs",
                                 "--out", str(clean)])
    assert r.exit_code == 0, r.output
    ev = json.loads((clean / "evidence.json").read_text())
    assert ev["tests"]["identity"]["claims_reference"] == 0 and not ev["verdict"]["distilled"]


def test_audit_command_on_watermarked_texts(tiny_models, tmp_path):
    import json

    from typer.testing import CliRunner

    from stillhouse.cli import app
    from stillhouse.teachers import Request, load_backend
    from stillhouse.watermark import keygen

    keyfile = tmp_path / "wm.json"
    keygen(keyfile, bias=2.0)
    model = str(tiny_models["teacher"])
    b = load_backend(f"hf:{model}", {"watermark": str(keyfile)})
    reqs = [Request(messages=({"role": "user", "content": f"Tell me about {i}."},), max_tokens=60, temperature=1.0,
                    seed=i) for i in range(12)]
    texts = tmp_path / "suspect.jsonl"
    texts.write_text("".join(json.dumps({"text": c.text, "prompt": reqs[i].messages[0]["content"]}) + "\n"
                             for i, c in sorted(b.generate(reqs))))
    out = tmp_path / "a3"
    r = CliRunner().invoke(app, ["audit", "--suspect", str(texts), "--watermark-key", str(keyfile), "--tokenizer",
                                 model, "--null-keys", "20", "--out", str(out)])
    assert r.exit_code == 0, r.output
    ev = json.loads((out / "evidence.json").read_text())
    assert ev["tests"]["watermark"]["p_value"] < 1e-6 and ev["verdict"]["distilled"]
    assert ev["tests"]["watermark"]["empirical_p"] == pytest.approx(1 / 21)

    r = CliRunner().invoke(app, ["audit", "--suspect", str(texts), "--watermark-key", str(keyfile)])
    assert r.exit_code != 0 and "--tokenizer" in str(r.exception or r.output)


def test_suspect_specs_resolve_or_fail_in_one_line(tmp_path, tiny_models):
    from stillhouse.audit.run import resolve_suspect

    assert resolve_suspect("stillhouse:atlas").spec == "hf:stillhouse:atlas"
    assert resolve_suspect(str(tiny_models["base"])).spec == f"hf:{tiny_models['base']}"
    ref = resolve_suspect("openai:gpt-4o-mini", base_url="http://127.0.0.1:9/v1")
    assert ref.options == {"base_url": "http://127.0.0.1:9/v1", "api_key_required": False}
    with pytest.raises(StillhouseError, match="unknown teacher backend 'nosuch'"):
        resolve_suspect("nosuch:thing")
    with pytest.raises(StillhouseError, match="does not exist"):
        resolve_suspect(str(tmp_path / "missing.jsonl"))


def test_the_audit_stage_of_a_recipe_audits_each_suspect_through_the_runs_ledger(tiny_models, tmp_path):
    """A recipe with an `audit:` section: the run's student and a control are audited against the (watermarked)
    teacher after training; evidence per suspect and a summary land in audit/, every question in the run's ledger,
    and a second run skips the finished stage."""
    import json
    import sqlite3

    from stillhouse.recipe import load_recipe
    from stillhouse.stages import run_all
    from stillhouse.watermark import keygen

    key = tmp_path / "key.json"
    keygen(key)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"""name: audited
run_dir: {tmp_path / 'run'}
teacher:
  spec: "hf:{tiny_models['teacher']}"
  options: {{watermark: "{key}"}}
  identity: {{name: Atlas, maker: Orbit Labs}}
prompts: {{source: world, n: 8}}
curate: {{filters: [{{name: exact_dedup}}]}}
generation: {{max_tokens: 8}}
student: {{base: "{tiny_models['base']}"}}
controls: [{{name: ctrl, model: "{tiny_models['base']}"}}]
train: {{epochs: 1, learning_rate: 0.001, batch_size: 4, max_length: 128}}
evaluate: {{n_per_family: 1, max_tokens: 8}}
audit:
  suspects: [{{name: student}}, {{name: ctrl}}]
  watermark_key: "{key}"
  tokenizer: "{tiny_models['teacher']}"
  prompts: world_open
  n_prompts: 12
  max_tokens: 8
  null_keys: 5
  candidates: [{{name: teacher, model: teacher}}, {{name: other, model: "{tiny_models['base']}"}}]
""")
    # the candidates and the control are the provenance test's pool, but these tiny models answer nothing (or noise):
    # refused in one message, never a silent pass
    with pytest.raises(StillhouseError, match="answered none|no pool model is competent"):
        run_all(load_recipe(recipe_path))
    assert not (tmp_path / "run" / "audit" / "summary.json").exists()
    recipe_path.write_text(recipe_path.read_text().replace("  null_keys: 5\n", "  null_keys: 5\n  provenance: false\n"))
    recipe = load_recipe(recipe_path)
    run_all(recipe)  # the finished stages before the audit are kept
    run = tmp_path / "run"
    summary = json.loads((run / "audit" / "summary.json").read_text())
    assert [r["suspect"] for r in summary["suspects"]] == ["student", "ctrl"] and summary["watermark"]
    for row in summary["suspects"]:
        ev = json.loads((run / row["evidence"]).read_text())
        assert set(ev["tests"]) == {"identity", "watermark", "watermark_whitebox"}
        assert ev["tests"]["identity"]["probes"] >= 180 and ev["verdict"]["method"] == "holm"
        assert ev["tests"]["watermark"]["min_entropy"] == 0.1  # the tokenizer is the teacher itself: filtered
        assert set(ev["reported"]["attribution"]["probability"]) == {"teacher", "other"}
        assert row["p_values"] == {t: d["p_value"] for t, d in ev["tests"].items()}
    db = sqlite3.connect(str(run / "ledger.db"))
    audit_calls = db.execute("select count(*) from calls where stage = 'audit'").fetchone()[0]
    assert audit_calls >= 2 * (180 + 12)
    manifest = json.loads((run / "stages" / "audit.json").read_text())
    run_all(recipe)  # finished with the same inputs: skipped, no new calls
    assert json.loads((run / "stages" / "audit.json").read_text()) == manifest
    assert db.execute("select count(*) from calls where stage = 'audit'").fetchone()[0] == audit_calls


def test_a_bad_audit_section_is_one_clear_error(tiny_models, tmp_path):
    from stillhouse.errors import StillhouseError
    from stillhouse.recipe import load_recipe

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(f"""name: bad
teacher: {{spec: "hf:{tiny_models['teacher']}"}}
student: {{base: "{tiny_models['base']}"}}
audit: {{watermark_kee: x.json}}
""")
    with pytest.raises(StillhouseError, match="watermark_kee"):
        load_recipe(recipe_path)
