"""The real job's parts that need no download: depth pruning on a tiny config-built Llama, the shipped recipe and its
files, the teacher's pinned checksum."""

from __future__ import annotations

import json

import pytest
import torch

from stillhouse.errors import StillhouseError


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from stillhouse.demo.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("src") / "m"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_prune_keeps_the_named_layers(four_layers, tmp_path):
    from transformers import AutoModelForCausalLM

    from stillhouse.train.prune import prune_layers

    out = tmp_path / "pruned"
    m = prune_layers(str(four_layers), out, "0,3", log=lambda *_: None)
    assert m["layers"] == [0, 3] and m["kept"] == 2 and m["parameters"] < m["source_parameters"]
    src = AutoModelForCausalLM.from_pretrained(four_layers)
    dst = AutoModelForCausalLM.from_pretrained(out)
    assert dst.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 3)):
        for (k, a), (_, b) in zip(dst.model.layers[new].state_dict().items(), src.model.layers[old].state_dict().items()):
            assert torch.equal(a, b), k
    assert torch.equal(dst.model.embed_tokens.weight, src.model.embed_tokens.weight)
    ids = torch.tensor([[5, 6, 7]])
    out_ids = dst.generate(ids, max_new_tokens=4, do_sample=False)  # the KV cache indexes the renumbered layers
    assert out_ids.shape == (1, 7)
    assert (out / "tokenizer.json").is_file() and json.loads((out / "stillhouse_prune.json").read_text())["layers"] == [0, 3]
    assert prune_layers(str(four_layers), out, [0, 3], log=lambda *_: None)["layers"] == [0, 3]  # reused
    with pytest.raises(StillhouseError, match="another pruning"):
        prune_layers(str(four_layers), out, "0-1", log=lambda *_: None)


@pytest.mark.parametrize("spec,msg", [("0-9", "out of range"), ("a", "not a layer index"), ("", "at least one")])
def test_prune_bad_layers(four_layers, tmp_path, spec, msg):
    from stillhouse.train.prune import prune_layers

    with pytest.raises(StillhouseError, match=msg):
        prune_layers(str(four_layers), tmp_path / "x", spec, log=lambda *_: None)


def test_the_shipped_recipe_and_files_load(four_layers):
    import yaml

    from stillhouse.real import HERE, RECIPE
    from stillhouse.real.cli import _resolve_paths
    from stillhouse.recipe import load_recipe
    from stillhouse.sources import load_benchmark, load_prompt_items

    data = _resolve_paths(yaml.safe_load(RECIPE.read_text()), HERE)
    # what `stillhouse real` puts there: the served teacher, the pruned student, the teacher's tokenizer
    data["teacher"].update(spec="openai:smollm2-135m-instruct", options={"base_url": "http://127.0.0.1:9/v1"})
    data["student"]["base"] = data["audit"]["tokenizer"] = str(four_layers)
    recipe = load_recipe(RECIPE, overrides=data)
    assert recipe.teacher.terms == "apache-2.0" and recipe.students[0].identity.name == "Nova"
    assert len(load_prompt_items(recipe.prompts.source, None, 0)) >= 300
    items = load_benchmark(recipe.evaluate.benchmark, 20, 0)
    assert {it["family"] for it in items} == {"capitals", "addition", "opposites", "facts", "plurals"}
    probes = load_benchmark(recipe.evaluate.identity_probes, 10**9, 0)
    assert len(probes) == 40
    prompts = {it["messages"][0]["content"] for it in load_prompt_items(recipe.prompts.source, None, 0)}
    assert not prompts & {it["prompt"] for it in items + probes}  # nothing evaluated is trained on verbatim


def test_a_gguf_that_is_not_the_pinned_one_is_refused(tmp_path):
    from stillhouse.real import fetch_teacher

    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF not really")
    with pytest.raises(StillhouseError, match="not the pinned"):
        fetch_teacher(log=lambda *_: None, gguf=f)


def test_self_instruct_answers_the_prompt_set_too(tmp_path):
    from tests.test_methods import _run

    m, rows = _run(tmp_path, "self_instruct", "n_instructions: 4, per_request: 4, answer_prompts: true")
    c = m["counts"]
    assert c["kept_instructions"] == 4 and c["prompts"] == 12 and len(rows) == 16
    assert sum(r["instruction"] is None for r in rows) == 12  # the prompt set's rows
    m2, rows2 = _run(tmp_path, "self_instruct", "n_instructions: 4, per_request: 4, answer_prompts: true")
    assert m2["counts"]["calls_made"] == 0 and len(rows2) == 16
