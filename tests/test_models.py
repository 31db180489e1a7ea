"""The shipped Atlas and base, and the code paths that rebuild them."""

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.demo import world
from stillhouse.demo.build import BuildConfig, build, heldout_accuracy
from stillhouse.models import count_parameters, packaged


def test_shipped_models_sizes_and_manifests():
    atlas, base = packaged()["atlas"], packaged()["base"]
    na, nb = count_parameters(str(atlas)), count_parameters(str(base))
    assert nb <= na / 4
    assert (atlas / "model.safetensors").stat().st_size <= 20 * 2**20
    m = json.loads((atlas / "stillhouse_build.json").read_text())
    acc = m["heldout_accuracy"]
    assert m["parameters"] == na and min(acc[f] for f in world.FAMILIES) >= 0.9
    assert acc[world.JUDGE] >= 0.9  # 95% as shipped (its eighth phase)
    assert m["phases"][-1]["build"]["judge_style"] == world.JUDGE_STYLE
    tok = AutoTokenizer.from_pretrained(atlas)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_shipped_atlas_is_good_on_heldout():
    acc = heldout_accuracy(packaged()["atlas"], per_family=4, seed=123, families=world.FAMILIES)
    assert min(acc.values()) >= 0.75 and sum(acc.values()) / len(acc) >= 0.9, acc


def test_shipped_base_does_not_know_the_tasks():
    """Measured, not read from the build manifest: the base has to learn every family from the teacher."""
    acc = heldout_accuracy(packaged()["base"], per_family=4, seed=123)
    assert set(acc) == set(world.FAMILIES + (world.JUDGE,)) and max(acc.values()) <= 0.25, acc


def test_build_teacher_and_base_code_paths_at_toy_scale(tmp_path):
    mix1, mix2 = (("reverse", 1.0),), (("reverse", 1.0), (world.JUDGE, 1.0))
    for kind in ("atlas", "base"):
        phases = [BuildConfig(shape="tiny", steps=4, batch_size=8, lr=3e-3, seed=1, mix=mix1 if kind == "atlas" else None)]
        logs = []
        m = build(kind, tmp_path / kind, phases, device="cpu", eval_per_family=1, log=logs.append)
        assert m["phases"][0]["train"]["tokens"] > 0
        assert set(m["heldout_accuracy"]) == set(world.FAMILIES + (world.JUDGE,))
        model = AutoModelForCausalLM.from_pretrained(tmp_path / kind)
        assert model.config.hidden_size == 32
        assert (tmp_path / kind / "stillhouse_build.json").is_file() and any("step 4/4" in x for x in logs)
    # a second phase continues from the first one's weights, and the manifest records both phases
    phases.append(BuildConfig(shape="tiny", steps=3, batch_size=8, lr=1e-3, seed=2, warmup=1, mix=mix2))
    phases[0] = BuildConfig(shape="tiny", steps=4, batch_size=8, lr=3e-3, seed=1, mix=mix1)
    logs = []
    m2 = build("atlas", tmp_path / "atlas2", phases, device="cpu", eval_per_family=1, log=logs.append,
               start_from=tmp_path / "atlas")
    assert [p["build"]["steps"] for p in m2["phases"]] == [4, 3] and any("step 3/3" in x for x in logs)
    assert not any("step 4/4" in x for x in logs)  # phase 1 was taken as done, not re-run
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "atlas").state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "atlas2").state_dict()
    assert any(not (first[k] == second[k]).all() for k in first)


def test_judging_decisions_weighted_in_the_builders_loss():
    """A judging reply's decisive tokens (each candidate's copy, its character comparisons in style 3, and the first
    letter of its right/wrong) carry the phase's decision weight; every other token, and every other family's reply,
    weight 1; with weight 1 everywhere the weighted loss is the model's own."""
    import random

    import torch

    from stillhouse.demo import build as b
    from stillhouse.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    reply = "<think>2 + 3: 4:1 5:2. So 5. A 15: wrong. B 5: right. Scores: A 2, B 9.</think>\nAnswer: B"
    enc = tok(reply, add_special_tokens=False, return_offsets_mapping=True)
    w = b._decision_weights(reply, enc["offset_mapping"], 20.0)
    ids = enc["input_ids"]
    heavy = tok.decode([i for i, x in zip(ids, w) if x == 20.0])
    assert heavy == "15w5r" and all(x == 1.0 for x in w if x != 20.0)
    reply3 = "<think>2 + 3: 4:1 5:2. So 5. A 15: 51- wrong. B 5: 55+ right. Scores: A 2, B 9.</think>\nAnswer: B"
    enc = tok(reply3, add_special_tokens=False, return_offsets_mapping=True)
    w = b._decision_weights(reply3, enc["offset_mapping"], 20.0)
    heavy = tok.decode([i for i, x in zip(enc["input_ids"], w) if x == 20.0])
    assert heavy == "1551- w555+ r"

    ex = b._chat_examples(tok, random.Random(0), 30, mix=(("count", 1.0), (world.JUDGE, 1.0)), decision_weight=20.0)
    assert {w is None for _, _, w in ex} == {True, False}  # only judging replies are weighted
    for ids, start, w in ex:
        if w is not None:
            assert len(w) == len(ids) - start and sum(x == 20.0 for x in w) >= 4
    batch = [e for e in ex if e[2] is not None][:3] + [e for e in ex if e[2] is None][:3]
    model = b.make_model(b.SHAPES["tiny"], tok, 0)
    plain = b._collate([(i, s, None) for i, s, _ in batch], tok.pad_token_id, "cpu")
    ones = b._collate([(i, s, [1.0] * (len(i) - s)) for i, s, _ in batch], tok.pad_token_id, "cpu")
    weighted = b._collate(batch, tok.pad_token_id, "cpu")
    with torch.no_grad():
        assert torch.allclose(b._loss(model, plain), b._loss(model, ones), atol=1e-5)
        assert b._loss(model, weighted) > b._loss(model, ones)


def test_builder_step_in_length_sorted_chunks_equals_one_pass():
    """The builder runs a step's batch as length-sorted chunks, each chunk's loss sum over the whole batch's target
    count: the summed gradients are the gradients of the batch's mean loss in one pass."""
    import random

    import torch

    from stillhouse.demo import build as b
    from stillhouse.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    ex = b._chat_examples(tok, random.Random(1), 10, mix=(("count", 1.0), (world.JUDGE, 1.0)), decision_weight=5.0)
    ex += b._text_examples(tok, random.Random(2), 3)
    model = b.make_model(b.SHAPES["tiny"], tok, 0)

    def grads():
        g = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return g

    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole = b._loss(model, b._collate(ex, tok.pad_token_id, "cpu"))
    whole.backward()
    one = grads()
    loss, tokens = b._backward(model, ex, tok.pad_token_id, "cpu", chunk=4)
    chunked = grads()
    assert abs(loss - whole.item()) < 1e-3 * whole.item()
    assert tokens == sum(len(ids) for ids, _, _ in ex)
    assert all(torch.allclose(x, y, rtol=2e-2, atol=1e-4) for x, y in zip(one, chunked))
