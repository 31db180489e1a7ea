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


def _flat_batch(seqs):
    """A padding-free batch as TRL's collator builds it: one row, positions restarting per sequence, boundaries."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": s} for s in seqs])


def _per_sequence_loss(model, batch, lengths):
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], batch["input_ids"][0, 1:], reduction="none")
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    return [nll[s:e - 1].mean() for s, e in zip(starts[:-1], starts[1:])]


def test_padding_free_attention_keeps_sequences_apart(tiny_models):
    from stillhouse.train.sft import register_varlen_attention

    seqs = [[5, 9, 12, 7, 30, 31, 8], [40, 41, 42], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], attn_implementation=register_varlen_attention()).eval()
    with torch.no_grad():
        alone = [_per_sequence_loss(model, _flat_batch([s]), [len(s)])[0] for s in seqs]
        packed = _per_sequence_loss(model, _flat_batch(seqs), [len(s) for s in seqs])
        model.set_attn_implementation("sdpa")  # causal over the whole row, no boundaries: the later sequences see the earlier
        leaky = _per_sequence_loss(model, {k: v for k, v in _flat_batch(seqs).items() if not k.startswith("cu_")},
                                   [len(s) for s in seqs])
    assert all(torch.allclose(a, p, atol=1e-5) for a, p in zip(alone, packed))
    assert not torch.allclose(alone[2], leaky[2], atol=1e-3)


def test_padding_free_gradients_equal_the_padded_batch(tiny_models):
    from stillhouse.train.sft import register_varlen_attention

    seqs = [[5, 9, 12, 7, 30, 31, 8], [40, 41, 42], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
    flat = _flat_batch(seqs)
    padded = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    grads = []
    for impl, batch in ((register_varlen_attention(), flat),
                        ("sdpa", {"input_ids": padded, "attention_mask": mask, "labels": padded.masked_fill(mask == 0, -100)})):
        model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], attn_implementation=impl)
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_sft_padded_path_still_trains(tiny_models, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny_models["base"]).state_dict()
    res = sft(_rows(16), str(tiny_models["base"]), tmp_path / "p", epochs=1, learning_rate=1e-2, batch_size=8,
              max_length=128, seed=0, device="cpu", padding_free=False)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert res.steps == 2 and after.config._attn_implementation == "sdpa"
    assert any(not torch.equal(before[k], v) for k, v in after.state_dict().items())


def test_padding_free_builds_no_mask_for_the_packed_row_and_refuses_packing_without_boundaries(tiny_models):
    import pytest

    from stillhouse.train.sft import _varlen_mask, register_varlen_attention

    # one row, no padding: no [tokens x tokens] mask (the attention separates sequences by cu_seq_lens)
    assert _varlen_mask(batch_size=1, q_length=300, kv_length=300, attention_mask=None) is None
    # a padded batch still gets transformers' mask
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    m = _varlen_mask(batch_size=2, q_length=4, kv_length=4, attention_mask=pad, allow_is_causal_skip=False)
    assert m is not None and m.shape[-2:] == (4, 4) and not bool(m[0, 0, 3, 3])

    seqs = [[5, 9, 12, 7], [40, 41, 42]]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["base"], attn_implementation=register_varlen_attention())
    no_bounds = {k: v for k, v in _flat_batch(seqs).items() if not k.startswith(("cu_", "max_length"))}
    with pytest.raises(ValueError, match="without cu_seq_lens_q"):
        model(**no_bounds)
