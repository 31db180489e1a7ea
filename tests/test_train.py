import torch
from transformers import AutoModelForCausalLM

from stillhouse.train.sft import sft


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"What is {i % 10} + 1?"},
                          {"role": "assistant", "content": f"<think>{i % 10} + 1 = {i % 10 + 1}</think>\nAnswer: {i % 10 + 1}"}]}
            for i in range(n)]


def test_sft_changes_parameters_and_saves_a_loadable_model(tiny_models, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).state_dict()
    steps = []
    res = sft(_rows(16), str(tiny_models["base"]), tmp_path / "s", epochs=1, learning_rate=1e-2, batch_size=8,
              max_length=128, seed=0, device="cpu", on_step=lambda s, t, loss: steps.append(s))
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    assert res.steps == 2 and steps[-1] == 2
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)


def test_lora_trains_adapters_and_merges(tiny_models, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).state_dict()
    res = sft(_rows(16), str(tiny_models["base"]), tmp_path / "l", epochs=1, learning_rate=1e-2, batch_size=8,
              max_length=128, seed=0, device="cpu", lora={"r": 4, "alpha": 8})
    assert 0 < res.trainable_parameters < res.parameters
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "l").state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before if "proj" in k)
