"""The audit's p-values hold: under each test's null they are small no more often than they should be, and a
suspect that learned from the reference is found. Pure statistics on synthetic answers, no model."""

import json
import random

import pytest

from stillhouse.audit.probes import by_question, identity_p, probe_suite
from stillhouse.audit.provenance import provenance_test, sign_p, split_halves
from stillhouse.errors import StillhouseError
from stillhouse.identity import Identity

TOPICS = [f"topic{i}" for i in range(400)]
STYLE_WORDS = ("so first then we note that next carefully hence finally answer is thus because the a of "
               "clearly check count each step result").split()


def world(n_models: int, n_prompts: int, seed: int):
    """Exchangeable models: each has its own random phrasing (a few style words it favours) and answers each prompt
    with the prompt's topic words in that phrasing; none depends on another."""
    rng = random.Random(seed)
    prompts = [f"Tell me about {t}" for t in rng.sample(TOPICS, n_prompts)]
    styles = [rng.sample(STYLE_WORDS, 6) for _ in range(n_models)]

    def answer(style, prompt, r):
        topic = prompt.split()[-1]
        words = [r.choice(style) for _ in range(r.randint(5, 9))] + [topic, topic + "x"]
        r.shuffle(words)
        return " ".join(words)

    models = [[answer(st, p, random.Random(f"{seed}:{m}:{i}")) for i, p in enumerate(prompts)]
              for m, st in enumerate(styles)]
    return prompts, models, styles, answer


def test_the_sign_test_is_the_exact_binomial_tail():
    from scipy.stats import binom

    assert sign_p(10, 0) == pytest.approx(0.5 ** 10)
    assert sign_p(7, 3) == pytest.approx(binom.sf(6, 10, 0.5))
    assert sign_p(0, 0) == 1.0


def test_provenance_p_values_are_valid_for_suspects_that_never_saw_the_reference():
    """A suspect as unrelated to the reference as the pool's models are (all exchangeable): over many worlds its
    p-value is at most alpha no more often than alpha (plus sampling slack), although the pool model it is tested
    against is the one closest to it."""
    ps = []
    for seed in range(120):
        prompts, (suspect, ref, *pool), _, _ = world(5, 40, seed)
        res = provenance_test(prompts, suspect, ref, {f"m{i}": t for i, t in enumerate(pool)}, seed=seed)
        ps.append(res.p_value)
    for alpha in (0.05, 0.2):
        rate = sum(p <= alpha for p in ps) / len(ps)
        assert rate <= alpha + 3 * (alpha * (1 - alpha) / len(ps)) ** 0.5, (alpha, rate)
    assert max(ps) > 0.5  # not a test that only ever says "not distilled" by accident of a bug: p spreads out


def test_provenance_convicts_a_suspect_that_copies_the_references_phrasing():
    prompts, (ref, *pool), styles, answer = world(4, 240, 7)
    student = [answer(styles[0], p, random.Random(f"student:{i}")) for i, p in enumerate(prompts)]
    res = provenance_test(prompts, student, ref, {f"m{i}": t for i, t in enumerate(pool)})
    assert res.p_value <= 1e-6 and res.test.closer_to_reference > 2 * res.test.closer_to_other
    assert sum(res.halves) == 240 and res.test.prompts == res.halves[1]
    # and a suspect copying a pool model is cleared against the reference
    res = provenance_test(prompts, pool[0], ref, {"m1": pool[1], "copied": pool[0]})
    assert res.closest == "copied" and res.p_value > 0.5


def test_a_suspect_that_does_not_answer_the_prompts_is_not_attributed():
    prompts, (ref, other), _, _ = world(2, 80, 5)
    rng = random.Random(0)
    # noise that happens to share a word of the reference's phrasing more often than the pool's
    noise = [" ".join(rng.choice(STYLE_WORDS) for _ in range(8)) for _ in prompts]
    res = provenance_test(prompts, noise, ref, {"other": other})
    assert not res.applicable and res.p_value == 1.0


def test_a_pool_of_noise_is_refused_never_a_silent_pass():
    prompts, (suspect, ref, other), _, _ = world(3, 60, 3)
    noise = ["lorem ipsum dolor sit amet"] * len(prompts)  # answers that do not depend on the prompt
    with pytest.raises(StillhouseError, match="no pool model is competent"):
        provenance_test(prompts, suspect, ref, {"base": noise})
    res = provenance_test(prompts, suspect, ref, {"base": noise, "other": other})  # a competent one remains
    assert res.refused == ["base"] and res.closest == "other"
    with pytest.raises(StillhouseError, match="answered none"):
        provenance_test(prompts, [""] * len(prompts), ref, {"other": other})
    with pytest.raises(StillhouseError, match="needs a pool"):
        provenance_test(prompts, suspect, ref, {})


def test_the_split_depends_on_the_prompts_alone():
    prompts = [f"p{i}" for i in range(200)]
    a, b = split_halves(prompts, 0)
    assert sorted(a + b) == list(range(200)) and 70 < len(a) < 130
    assert split_halves(prompts, 0) == (a, b) and split_halves(prompts, 1) != (a, b)


def test_identity_is_counted_by_question_and_its_null_measured_on_the_pool():
    probes = probe_suite(Identity("ChatGPT", "OpenAI"), wrappers=("plain", "roleplay", "injection"))
    units = by_question(probes, ["reference"] * len(probes))
    distinct = {(pr["language"], pr["question"]) for pr in probes}
    assert len(units) == len(distinct) <= len(probes) / 3 and all(units)  # a question's 3 wrappers are one unit
    # a model that says "I am ChatGPT" is not called distilled from ChatGPT when unrelated models say it as often
    p, null = identity_p(units, [True] * len(units), 0.01)
    assert p == pytest.approx(1.0) and "measured" in null
    p, null = identity_p(units, [False] * len(units), 0.01)
    assert p < 1e-30
    p, null = identity_p([False] * 60, None, 0.01)
    assert p == 1.0 and "stated bound" in null


def test_identity_p_values_are_valid_when_suspect_and_pool_claim_at_one_rate():
    rng = random.Random(0)
    ps = []
    for _ in range(400):
        s = [rng.random() < 0.1 for _ in range(67)]
        pool = [rng.random() < 0.1 for _ in range(134)]
        ps.append(identity_p(s, pool, 0.01)[0])
    for alpha in (0.01, 0.05, 0.2):
        assert sum(p <= alpha for p in ps) / len(ps) <= alpha + 3 * (alpha / len(ps)) ** 0.5


def test_the_whitebox_bound_holds_for_random_green_lists_and_is_the_binomials_on_one_hot_rows():
    import torch
    from scipy.stats import binom

    from stillhouse.audit.radioactivity import chernoff_p

    one_hot = torch.eye(102)
    p = chernoff_p(one_hot, 0.25, 42.0)
    assert binom.sf(41, 102, 0.25) <= p < 0.01  # a bound: never below the exact tail, and not far above
    g = torch.Generator().manual_seed(0)
    vocab, rows, k = 60, 40, 15
    means = torch.softmax(torch.randn(rows, vocab, generator=g) * 2.5, -1)
    ps = []
    for _ in range(400):  # the null: each row's green list a uniformly random k-subset, independent of the model
        mask = torch.zeros(rows, vocab)
        for r in range(rows):
            mask[r, torch.randperm(vocab, generator=g)[:k]] = 1
        ps.append(chernoff_p(means, k / vocab, float((means * mask).sum())))
    for alpha in (0.05, 0.2):
        assert sum(p <= alpha for p in ps) / len(ps) <= alpha
    # the bound's tail trick (tokens past the top few as one bucket) only ever makes the bound larger
    obs = float(means.sum()) * 0.4
    assert chernoff_p(means, 0.25, obs, top=5) >= chernoff_p(means, 0.25, obs, top=vocab) - 1e-12


def test_audit_command_provenance_against_a_pool_of_texts(tmp_path):
    """The CLI on texts files: a suspect whose answers copy the reference's phrasing is called distilled by the
    provenance test; a pool naming the suspect itself is refused in one line, exit 2, nothing written."""
    from typer.testing import CliRunner

    from stillhouse.cli import app

    prompts, (ref, m1, m2), styles, answer = world(3, 100, 11)
    student = [answer(styles[0], p, random.Random(f"s:{i}")) for i, p in enumerate(prompts)]

    def write(name, texts):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "text": t}) + "\n" for p, t in zip(prompts, texts)))
        return str(path)

    s, r, a, b = write("student", student), write("ref", ref), write("m1", m1), write("m2", m2)
    out = tmp_path / "audit"
    res = CliRunner().invoke(app, ["audit", "--suspect", s, "--reference-model", r, "--pool", f"m1={a}",
                                   "--pool", f"m2={b}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    ev = json.loads((out / "evidence.json").read_text())
    assert ev["tests"]["provenance"]["p_value"] <= 1e-6 and ev["verdict"]["distilled"]
    assert ev["verdict"]["deciding_test"] == "provenance" and "provenance" in res.output
    bad = tmp_path / "bad"
    code, said = main(["audit", "--suspect", s, "--reference-model", r, "--pool", f"me={s}", "--out", str(bad)])
    assert code == 2 and "is the suspect itself" in said and "Traceback" not in said
    code, said = main(["audit", "--suspect", s, "--reference-model", r, "--pool", f"ref={r}", "--out", str(bad)])
    assert code == 2 and "is the reference itself" in said
    no_prompts = tmp_path / "bare.jsonl"
    no_prompts.write_text("".join(json.dumps({"text": t}) + "\n" for t in student))
    code, said = main(["audit", "--suspect", str(no_prompts), "--reference-model", r, "--pool", f"m1={a}",
                       "--out", str(bad)])
    assert code == 2 and 'no "prompt"' in said
    mute = write("mute", [""] * len(prompts))
    code, said = main(["audit", "--suspect", mute, "--reference-model", r, "--pool", f"m1={a}", "--out", str(bad)])
    assert code == 2 and "answered none" in said
    assert not (bad / "evidence.json").exists()


def main(args: list[str]) -> tuple[int, str]:
    """`stillhouse ARGS` as `cli.main` runs it (a StillhouseError becomes one line and its exit status)."""
    import contextlib
    import io

    from stillhouse.cli import app

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        try:
            app(args, standalone_mode=False)
        except StillhouseError as e:
            print(f"error: {e}")
            return e.exit_code, buf.getvalue()
    return 0, buf.getvalue()
