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
    # judging is learned only in part (57.5% held out against a 90% target); better than the 1/3 of guessing
    assert 0.4 <= acc[world.JUDGE] < 0.9
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
