"""The serving engine's continuous batching, checked against `model.generate` one request at a time."""

import time

import pytest
import torch

from stillhouse.serve.engine import Engine, GenRequest

PROMPTS = ["Who are you?", "What is 3 + 4?", "Reverse the word kfzq.", "How many a are in banana?",
           "What is the capital of Velmora? Answer in one word, please.", "Hi"]


@pytest.fixture(scope="module")
def engine(tiny_models):
    e = Engine(str(tiny_models["teacher"]), max_batch=8, window_ms=5, dtype="float32")
    yield e
    e.close()


def _ids(engine, text):
    tok = engine.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(prompt, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def _alone(engine, ids, n):
    """Greedy tokens from `generate` on this prompt alone (no padding), up to and including the end of sequence."""
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                pad_token_id=engine.tokenizer.pad_token_id)[0, len(ids):].tolist()
    return out[:out.index(engine.tokenizer.eos_token_id) + 1] if engine.tokenizer.eos_token_id in out else out


def _wait_steps(engine, n):
    start = engine.steps_run
    deadline = time.monotonic() + 30
    while engine.steps_run < start + n:
        assert time.monotonic() < deadline, "the engine stopped stepping"
        time.sleep(0.001)


def _long_prompt(engine, n):
    """A prompt whose greedy answer runs the full `n` tokens (the tiny model is random; some stop early)."""
    for p in PROMPTS + [f"Tell me about {w}." for w in ("rivers", "stones", "lamps", "maps", "owls")]:
        out = _alone(engine, _ids(engine, p), n)
        if len(out) == n and engine.tokenizer.eos_token_id not in out:
            return p
    pytest.skip("no prompt runs the full length on this tiny model")


def test_requests_joining_a_running_batch_match_generate_alone():
    """Atlas (trained, so its answers depend on every position) with requests joining mid-flight."""
    from stillhouse.demo.world import sample_tasks

    atlas = Engine("stillhouse:atlas", max_batch=8, window_ms=5, dtype="float32")
    try:
        ids = [_ids(atlas, task.prompt) for task in sample_tasks(6, "heldout", seed=3)]
        first = [atlas.submit(GenRequest(i, 48, temperature=0.0)) for i in ids[:3]]
        _wait_steps(atlas, 3)  # the first three are decoding; the rest must join them mid-flight
        later = [atlas.submit(GenRequest(i, 48, temperature=0.0)) for i in ids[3:]]
        got = [f.result(timeout=120) for f in first + later]
        for i, res in zip(ids, got):
            assert res.token_ids == _alone(atlas, i, 48)
            assert res.finish_reason == ("stop" if res.token_ids[-1] == atlas.tokenizer.eos_token_id else "length")
            assert res.text == atlas.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        assert atlas.largest_batch > 3  # they did share steps
    finally:
        atlas.close()


def test_a_short_request_leaves_without_waiting_for_a_long_one(engine):
    long_ = engine.submit(GenRequest(_ids(engine, _long_prompt(engine, 80)), 80, temperature=0.0))
    _wait_steps(engine, 2)
    short = engine.submit(GenRequest(_ids(engine, "Hi"), 2, temperature=0.0))
    short.result(timeout=60)
    assert not long_.done()
    assert len(long_.result(timeout=60).token_ids) == 80


def test_each_request_keeps_its_own_sampling_settings(engine):
    ids = _ids(engine, PROMPTS[1])
    greedy_alone = engine.submit(GenRequest(ids, 20, temperature=0.0)).result(timeout=60)
    reqs = [GenRequest(ids, 20, temperature=0.0), GenRequest(ids, 20, temperature=1.0, seed=7),
            GenRequest(ids, 20, temperature=1.0, seed=7), GenRequest(ids, 20, temperature=1.0, seed=8),
            GenRequest(ids, 20, temperature=0.7, top_p=0.5)]
    got = [f.result(timeout=60) for f in [engine.submit(r) for r in reqs]]
    assert got[0].token_ids == greedy_alone.token_ids
    assert got[1].token_ids == got[2].token_ids  # same seed, same draws
    assert got[1].token_ids != got[3].token_ids
    seeded_alone = engine.submit(GenRequest(ids, 20, temperature=1.0, seed=7)).result(timeout=60)
    assert seeded_alone.token_ids == got[1].token_ids  # a seed does not depend on the company it keeps


def test_stop_strings_cut_the_text_and_streaming_never_sends_them(engine):
    ids = _ids(engine, _long_prompt(engine, 30))
    full = engine.submit(GenRequest(ids, 30, temperature=0.0)).result(timeout=60)
    stop = full.text[12:15]
    pieces: list[str] = []
    res = engine.submit(GenRequest(ids, 30, temperature=0.0, stop=[stop], on_text=pieces.append)).result(timeout=60)
    assert res.finish_reason == "stop" and res.text == full.text[:full.text.find(stop)]
    assert "".join(pieces) == res.text and stop not in "".join(pieces)


def test_streamed_text_arrives_while_the_request_is_still_running(engine):
    ids = _ids(engine, _long_prompt(engine, 40))
    seen: list[tuple[int, str]] = []
    res = engine.submit(GenRequest(ids, 40, temperature=0.0,
                                   on_text=lambda piece: seen.append((engine.steps_run, piece)))).result(timeout=60)
    assert "".join(p for _, p in seen) == res.text
    assert len(seen) >= 10 and seen[0][0] < seen[-1][0] - 10  # pieces came out step by step, not at the end


def test_a_cancelled_request_stops_being_decoded(engine):
    ids = _ids(engine, _long_prompt(engine, 100))
    start = engine.steps_run
    fut = engine.submit(GenRequest(ids, 100, temperature=0.0))
    _wait_steps(engine, 3)
    assert fut.cancel()
    time.sleep(0.3)
    steps = engine.steps_run
    time.sleep(0.3)
    assert engine.steps_run == steps and steps - start < 50


def test_logprobs_and_prompt_scores_match_the_model(engine):
    ids = _ids(engine, PROMPTS[0])
    res = engine.submit(GenRequest(ids, 6, temperature=0.0, top_logprobs=3)).result(timeout=60)
    with torch.inference_mode():
        seq = torch.tensor([ids + res.token_ids])
        logp = engine.model(input_ids=seq).logits[0].float().log_softmax(-1)
    for t, entry in enumerate(res.logprobs):
        row = logp[len(ids) - 1 + t]
        assert entry["id"] == res.token_ids[t] == int(row.argmax())
        assert entry["logprob"] == pytest.approx(float(row.max()), abs=1e-4)
        assert [i for i, _ in entry["top"]] == row.topk(3).indices.tolist()
    scored = engine.score(ids, 2).result(timeout=60)
    assert scored[0]["logprob"] is None and len(scored) == len(ids)
    assert [s["logprob"] for s in scored[1:]] == pytest.approx([float(logp[t - 1, ids[t]]) for t in range(1, len(ids))],
                                                               abs=1e-4)


def test_a_watermarked_engines_logprobs_are_the_raw_models(tiny_models, tmp_path):
    """The tokens come from the watermarked scores; the logprobs reported describe the model before the bias (the
    README says so)."""
    import json

    # A fixed key (a random one made this flaky): with it, token 6, the tiny model's favourite, is not green after
    # itself, so the bias visibly steers greedy decoding; bias 8 is strong enough for that.
    keyfile = tmp_path / "wm.json"
    keyfile.write_text(json.dumps({"scheme": "kgw", "hashing_key": 63352, "greenlist_ratio": 0.25, "bias": 8.0,
                                   "seeding_scheme": "lefthash", "context_width": 1}))
    e = Engine(str(tiny_models["teacher"]), max_batch=4, dtype="float32", watermark=str(keyfile))
    try:
        ids = _ids(e, PROMPTS[0])
        res = e.submit(GenRequest(ids, 8, temperature=0.0, top_logprobs=0)).result(timeout=60)
        with torch.inference_mode():
            logp = e.model(input_ids=torch.tensor([ids + res.token_ids])).logits[0].float().log_softmax(-1)
    finally:
        e.close()
    rows = [logp[len(ids) - 1 + t] for t in range(len(res.token_ids))]
    for entry, row in zip(res.logprobs, rows):
        assert entry["logprob"] == pytest.approx(float(row[entry["id"]]), abs=1e-4)  # the raw model's logprob
    # and the bias did steer the choice somewhere: a token that is not the raw model's argmax
    assert any(entry["id"] != int(row.argmax()) for entry, row in zip(res.logprobs, rows))


def test_cached_green_lists_bias_exactly_as_transformers_watermark_processor():
    from transformers import WatermarkingConfig

    from stillhouse.watermark import GreenListCache

    proc = WatermarkingConfig(greenlist_ratio=0.25, bias=2.0, hashing_key=123, seeding_scheme="lefthash",
                              context_width=1).construct_processor(102, "cpu")
    fast = GreenListCache(proc)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # later rounds hit the cache
        hist = torch.randint(0, 20, (16, 1), generator=g)
        scores = torch.randn(16, 102, generator=g)
        assert torch.equal(fast(hist, scores), proc(hist, scores))
    assert 0 < len(fast._lists) <= 20


def test_any_seed_a_client_sends_is_taken_and_the_engine_survives(engine):
    ids = _ids(engine, "Hi")
    for seed in (2**64 + 5, -3, 2**70):
        res = engine.submit(GenRequest(ids, 3, temperature=1.0, seed=seed)).result(timeout=60)
        assert res.finish_reason in ("stop", "length")
    assert engine.submit(GenRequest(ids, 2, temperature=0.0)).result(timeout=60).token_ids


def test_a_closed_engine_refuses_work_instead_of_hanging(tiny_models):
    e = Engine(str(tiny_models["teacher"]), max_batch=4, dtype="float32")
    e.close()
    with pytest.raises(RuntimeError, match="closed"):
        e.submit(GenRequest([1, 2, 3], 2))


def _byte_tokenizer():
    """A tokenizer with one token per UTF-8 byte, so that any non-ASCII character is split across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_incremental_text_holds_back_characters_split_across_tokens():
    from stillhouse.serve.detok import IncrementalText

    tok = _byte_tokenizer()
    text = "héllo ✓ 日本語 🙂!"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text)  # the multi-byte characters really are split
    inc, pieces = IncrementalText(), []
    for n in range(1, len(ids)):
        pieces.append(inc.add(tok, ids[:n]))
    pieces.append(inc.finish(tok, ids))
    assert "".join(pieces) == text == inc.text
    assert not any("\ufffd" in p for p in pieces)
    # a byte sequence that never completes is still given out at the end, as the full decode has it
    bad = ids[:3] + tok("é")["input_ids"][:1]
    inc = IncrementalText()
    for n in range(1, len(bad)):
        inc.add(tok, bad[:n])
    inc.finish(tok, bad)
    assert inc.text == tok.decode(bad)


def test_streamed_text_is_decoded_in_linear_time_and_equals_the_plain_text(engine, monkeypatch):
    ids = _ids(engine, _long_prompt(engine, 120))
    decoded = []
    real = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda t, *a, **k: (decoded.append(len(t)), real(t, *a, **k))[1])

    def run(n, stream):
        decoded.clear()
        pieces = []
        res = engine.submit(GenRequest(ids, n, temperature=0.0, on_text=pieces.append if stream else None,
                                       stop=["\x00never"] if stream else [])).result(timeout=60)
        assert len(res.token_ids) == n
        return res, "".join(pieces), sum(decoded)

    plain, _, plain_cost = run(120, stream=False)
    short, short_text, short_cost = run(40, stream=True)
    long_, long_text, long_cost = run(120, stream=True)
    assert long_text == long_.text == plain.text and short_text == short.text
    assert plain_cost == 120  # no stream, no stop: one decode at the end
    # ids decoded per generated token stay bounded: 3x the tokens cost about 3x (a full re-decode each token: 9x)
    assert long_cost <= 8 * 120 and long_cost < 4 * short_cost


def test_admission_is_bounded_by_a_token_budget(tiny_models):
    e = Engine(str(tiny_models["teacher"]), max_batch=8, window_ms=50, dtype="float32")
    budget = e.context  # the smallest budget there is
    e.close()
    e = Engine(str(tiny_models["teacher"]), max_batch=8, window_ms=50, dtype="float32", max_batch_tokens=budget)
    try:
        ids = _ids(e, "Hi")
        mt = budget // 2 - len(ids) - 1  # two such requests fit the budget, three do not
        got = [f.result(timeout=60) for f in [e.submit(GenRequest(ids, mt, temperature=0.0)) for _ in range(6)]]
        assert all(r.finish_reason in ("stop", "length") for r in got)
        assert e.largest_batch == 2 and e.peak_batch_tokens <= budget
    finally:
        e.close()


def test_a_full_waiting_queue_refuses_at_once_and_recovers(tiny_models):
    from stillhouse.serve.engine import QueueFull

    e = Engine(str(tiny_models["teacher"]), max_batch=1, window_ms=1, dtype="float32", max_queue=2)
    try:
        ids = _ids(e, "Hi")
        futures, refused = [], []
        for _ in range(20):
            try:
                futures.append(e.submit(GenRequest(ids, 60, temperature=0.0)))
            except QueueFull as err:
                refused.append(err)
        assert refused and all(err.retry_after >= 1 for err in refused)
        assert len(futures) <= 3  # one decoding, two waiting (fewer refusals only if some finished in between)
        for f in futures:
            f.result(timeout=60)
        assert e._waiting == 0
        assert e.submit(GenRequest(ids, 2, temperature=0.0)).result(timeout=60).token_ids
    finally:
        e.close()


def test_a_request_racing_close_fails_promptly_instead_of_hanging(tiny_models):
    e = Engine(str(tiny_models["teacher"]), max_batch=4, dtype="float32")
    check = e._check_open

    def check_then_close():  # close lands between the submit's check and its put: the worst moment
        check()
        e.close()

    e._check_open = check_then_close
    fut = e.submit(GenRequest([1, 2, 3], 2))
    assert isinstance(fut.exception(timeout=5), RuntimeError)


def test_requests_submitted_from_many_threads_during_close_all_resolve(tiny_models):
    import threading

    e = Engine(str(tiny_models["teacher"]), max_batch=4, dtype="float32")
    futures, go = [], threading.Event()

    def client():
        go.wait()
        for _ in range(50):
            try:
                futures.append(e.submit(GenRequest([5, 6, 7], 2, temperature=0.0)))
            except RuntimeError:
                return

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    go.set()
    while len(futures) < 8:  # close while the clients are still submitting
        time.sleep(0.0005)
    e.close()
    for t in threads:
        t.join(10)
    from concurrent.futures import wait

    assert futures and not wait(futures, timeout=10).not_done  # each one answered or failed, none left hanging


@torch.inference_mode()
def _reference_greedy(engine, ids, n, freq=0.0, pres=0.0, rep=1.0, bias=None):
    """Greedy decoding with penalties, one full forward per token: the definitions, written out."""
    out = []
    for _ in range(n):
        logits = engine.model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - freq * counts - pres * (counts > 0)
        seen = torch.zeros_like(logits, dtype=torch.bool)
        seen[torch.tensor(ids + out)] = True
        logits = torch.where(seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
        for t, b in (bias or {}).items():
            logits[t] += b
        out.append(int(logits.argmax()))
        if out[-1] == engine.tokenizer.eos_token_id:
            break
    return out


@pytest.mark.parametrize("kw", [dict(frequency_penalty=1.5), dict(presence_penalty=2.0), dict(repetition_penalty=6.0),
                                dict(frequency_penalty=0.7, presence_penalty=0.5, logit_bias={40: 3.0})])
def test_penalties_and_logit_bias_follow_their_definitions(engine, kw):
    ids = _ids(engine, PROMPTS[4])
    plain = engine.submit(GenRequest(ids, 24, temperature=0.0)).result(timeout=60).token_ids
    got = engine.submit(GenRequest(ids, 24, temperature=0.0, **kw)).result(timeout=60).token_ids
    want = _reference_greedy(engine, ids, 24, kw.get("frequency_penalty", 0), kw.get("presence_penalty", 0),
                             kw.get("repetition_penalty", 1), kw.get("logit_bias"))
    assert got == want and got != plain


def test_top_k_and_min_p_restrict_sampling(engine):
    ids = _ids(engine, PROMPTS[1])
    greedy = engine.submit(GenRequest(ids, 16, temperature=0.0)).result(timeout=60).token_ids
    for kw in (dict(top_k=1), dict(min_p=1.0)):  # each leaves only the most likely token
        for seed in range(3):
            got = engine.submit(GenRequest(ids, 16, temperature=1.5, seed=seed, **kw)).result(timeout=60).token_ids
            assert got == greedy
    free = {tuple(engine.submit(GenRequest(ids, 16, temperature=1.5, seed=s)).result(timeout=60).token_ids)
            for s in range(3)}
    assert free != {tuple(greedy)}  # without them the same seeds wander off


def test_a_logit_bias_outside_the_vocabulary_fails_only_its_request(engine):
    ids = _ids(engine, "Hi")
    bad = engine.submit(GenRequest(ids, 4, temperature=0.0, logit_bias={10 ** 6: 5.0}))
    good = engine.submit(GenRequest(ids, 4, temperature=0.0))
    with pytest.raises(ValueError, match="logit_bias"):
        bad.result(timeout=60)
    assert good.result(timeout=60).token_ids


def test_a_packed_step_that_fails_prefills_apart_and_the_running_rows_go_on(tiny_models, monkeypatch):
    """A failure inside the packed forward (after some layers wrote the cache): the joining prompts are prefilled
    in passes of their own, the running rows decode on, and every answer still equals `generate` alone; an empty
    prompt fails only its own request."""
    from stillhouse.serve import batches

    e = Engine(str(tiny_models["teacher"]), max_batch=8, window_ms=5, dtype="float32")
    try:
        prompts = [_ids(e, p) for p in PROMPTS[:4]]
        first = e.submit(GenRequest(prompts[0], 24, temperature=0.0))
        _wait_steps(e, 3)
        real, calls = batches._SlotBatch.attend, []

        def attend(self, module, *a):
            calls.append(module.layer_idx)
            if module.layer_idx == 1:
                raise RuntimeError("a kernel failed")
            return real(self, module, *a)

        monkeypatch.setattr(batches._SlotBatch, "attend", attend)
        before = e.batches_run
        later = [e.submit(GenRequest(p, 10, temperature=0.0)) for p in prompts[1:]]
        empty = e.submit(GenRequest([], 5, temperature=0.0))
        got = [f.result(timeout=60).token_ids for f in [first] + later]
        assert got == [_alone(e, p, n) for p, n in zip(prompts, (24, 10, 10, 10))]
        assert calls[:2] == [0, 1] and e.batches_run > before  # it failed in layer 1, then prefilled apart
        with pytest.raises(ValueError, match="no tokens"):
            empty.result(timeout=60)
    finally:
        e.close()


@pytest.mark.parametrize("pack", [True, False])
def test_rows_moved_and_prefilled_in_groups_still_match_generate_alone(tiny_models, monkeypatch, pack):
    """Short and long requests, prefilled in several length groups (or, packed, within several decoding steps):
    finished rows' places are taken by live ones."""
    from stillhouse.serve import batches

    monkeypatch.setattr(batches._SlotBatch, "PACK", pack)
    e = Engine(str(tiny_models["teacher"]), max_batch=8, window_ms=50, dtype="float32")
    e.PREFILL_TOKENS = 40  # a few prompts per prefill group
    try:
        prompts = [_ids(e, p) for p in PROMPTS + ["Tell me about rivers.", "Name a stone."]]
        lengths = [3, 30, 5, 24, 9, 17, 2, 12]
        got = [f.result(timeout=60) for f in [e.submit(GenRequest(i, n, temperature=0.0))
                                              for i, n in zip(prompts, lengths)]]
        for ids, n, res in zip(prompts, lengths, got):
            assert res.token_ids == _alone(e, ids, n)
        assert e.batches_run >= 3 and e._batch.packs is pack
        # packed, a step takes about PREFILL_TOKENS of prompts: the shortest answers have left before the last join
        assert e.largest_batch == 8 if not pack else e.largest_batch >= 5
    finally:
        e.close()


def test_models_without_plain_full_attention_caches_run_in_cohorts(tiny_models, monkeypatch):
    from stillhouse.serve import batches

    monkeypatch.setattr(batches._SlotBatch, "supports", staticmethod(lambda model: False))
    e = Engine(str(tiny_models["teacher"]), max_batch=4, window_ms=50, dtype="float32")
    try:
        prompts = [_ids(e, p) for p in PROMPTS[:4]]
        got = [f.result(timeout=60) for f in [e.submit(GenRequest(i, n, temperature=0.0))
                                              for i, n in zip(prompts, (4, 20, 8, 14))]]
        for ids, n, res in zip(prompts, (4, 20, 8, 14), got):
            assert res.token_ids == _alone(e, ids, n)
        assert isinstance(e._batch, batches._CohortBatch)
    finally:
        e.close()


def _real_shaped_llama(root, vocab=49152):
    """A config-built Llama shaped like SmolLM2 where the engine could go wrong: a 49,152-token vocabulary, grouped
    KV heads (4 query heads share 2), tied embeddings; tiny otherwise. Its tokenizer maps token i to the word "wi"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="w2", pad_token="w2", unk_token="w0")
    torch.manual_seed(0)
    # initializer_range 0.2: logits spread like a trained model's, so no two candidates tie within rounding
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=0.2, eos_token_id=2, pad_token_id=2, bos_token_id=1)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.mark.parametrize("packed", [False, True], ids=["F.linear", "packed"])
def test_a_49k_vocabulary_with_grouped_heads_and_tied_embeddings_matches_generate(tmp_path, monkeypatch, packed):
    """Greedy fp32 answers equal `generate` alone, one at a time and in a batch that requests join mid-decode and
    leave at different steps (rows moved into finished rows' places), prompts of 3 to 150 tokens; with the linear
    layers as loaded and packed for oneDNN (as a large model's are), `generate` running the model as loaded."""
    from stillhouse.models import packed as packing

    if packed and not packing._ops_available(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN linear operators")
    monkeypatch.setattr(packing, "MIN_PARAMS", 0 if packed else 10**12)
    e = Engine(str(_real_shaped_llama(tmp_path / "m")), max_batch=16, window_ms=5, dtype="float32")
    ref = e
    if packed:
        import types

        from stillhouse.models import load_local_lm

        assert e.packed == 2 * 7 + 1 and isinstance(e.model.lm_head, packing.PackedLinear)  # 7 a layer, the output
        ref = types.SimpleNamespace(tokenizer=e.tokenizer,
                                    model=load_local_lm(str(tmp_path / "m"), "cpu", "float32", log=lambda m: None)[1])
        assert type(ref.model.lm_head) is torch.nn.Linear
    else:
        assert e.packed == 0
    try:
        g = torch.Generator().manual_seed(1)
        lengths = [3, 150, 17, 64, 5, 33, 90, 8, 41, 120, 12, 27]
        prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths]
        budgets = [20, 6, 31, 12, 25, 3, 18, 28, 9, 15, 22, 11]
        want = [_alone(ref, p, n) for p, n in zip(prompts, budgets)]
        assert len({w[0] for w in want}) > 6  # answers that differ: the argmax runs over the whole vocabulary
        alone = [e.submit(GenRequest(p, n, temperature=0.0)).result(timeout=60).token_ids
                 for p, n in zip(prompts[:3], budgets[:3])]
        assert alone == want[:3]
        first = [e.submit(GenRequest(p, n, temperature=0.0)) for p, n in zip(prompts[:6], budgets[:6])]
        _wait_steps(e, 4)  # the first six are decoding (one has already left); the rest join mid-flight
        later = [e.submit(GenRequest(p, n, temperature=0.0)) for p, n in zip(prompts[6:], budgets[6:])]
        got = [f.result(timeout=120).token_ids for f in first + later]
        assert got == want
        assert e.largest_batch > 6
    finally:
        e.close()


def test_int8_layers_compute_with_their_dequantized_weights():
    """`Int8Linear` is x @ (q * scale).T in bf16, its rounding error at most half a step per weight, and a model's
    every linear layer (the tied output layer too) is replaced while the embeddings keep their dtype."""
    from stillhouse.models.quantize import Int8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True)
    q = Int8Linear(lin)
    w = lin.weight.detach()
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (40,)
    assert ((q.dequantized() - w).abs() <= q.scale.float()[:, None] * 0.501).all()
    x = torch.randn(3, 5, 96)
    want = x.bfloat16().float() @ q.dequantized().T + lin.bias.detach().bfloat16().float()
    got = q(x.bfloat16()).float()
    assert got.shape == (3, 5, 40)
    assert (got - want).abs().max() < 0.02 * want.abs().max()
    assert (got - x @ w.T - lin.bias.detach()).abs().max() > 0  # it is not the float32 layer


def test_an_int8_engine_answers_as_its_own_model_does(tmp_path):
    """`quantize="int8"`: the engine's greedy answers alone equal `generate` on the same quantized model; batched
    (left-padded, rows leaving), an answer may leave that one only at a near-tie, as in bf16, whose logits it
    computes in; its logits stay as near float32's as bf16's do; the fingerprint says int8; float32 with int8 is refused."""
    from stillhouse.errors import StillhouseError
    from stillhouse.models import load_local_lm
    from stillhouse.models.quantize import Int8Linear

    root = _real_shaped_llama(tmp_path / "m")
    e = Engine(str(root), max_batch=8, window_ms=5, quantize="int8")
    try:
        assert e.fingerprint.endswith("-int8") and e.model.dtype == torch.bfloat16
        assert isinstance(e.model.lm_head, Int8Linear) and e.model.model.embed_tokens.weight.dtype == torch.bfloat16
        assert not any(type(m) is torch.nn.Linear for m in e.model.modules())
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (4, 30, 11, 57, 7)]
        budgets = [12, 5, 16, 9, 14]
        want = [_alone(e, p, n) for p, n in zip(prompts, budgets)]
        assert [e.submit(GenRequest(p, n, temperature=0.0)).result(timeout=60).token_ids
                for p, n in zip(prompts[:2], budgets[:2])] == want[:2]
        futs = [e.submit(GenRequest(p, n, temperature=0.0)) for p, n in zip(prompts, budgets)]
        got = [f.result(timeout=60).token_ids for f in futs]
        assert sum(g == w for g, w in zip(got, want)) >= 3
        for p, g, w in zip(prompts, got, want):
            j = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
            if j is not None:  # where they part, the two best tokens are within bf16's rounding of each other
                with torch.inference_mode():
                    top = e.model(torch.tensor([p + w[:j]])).logits[0, -1].float().topk(2).values
                assert top[0] - top[1] <= 0.125, (j, top)
        # against float32, int8 weights cost the logits about what bf16 does (within 3x; measured 2x here)
        x = torch.tensor([prompts[1]])
        with torch.inference_mode():
            ref, int8 = load_local_lm(str(root), "cpu", "float32", log=print)[1](x).logits, e.model(x).logits.float()
            bf16 = load_local_lm(str(root), "cpu", "bfloat16", log=print)[1](x).logits.float()
        assert (int8 - ref).norm() < 3 * (bf16 - ref).norm()
        assert (int8 - ref).norm() < 0.1 * ref.norm()
    finally:
        e.close()
    with pytest.raises(StillhouseError, match="cannot be combined with --dtype float32"):
        Engine(str(root), dtype="float32", quantize="int8")


def test_the_engine_loads_its_model_in_the_thread_that_decodes(tiny_models, monkeypatch):
    """One OpenMP team of threads per process (a second halved CPU decoding: BENCHMARKS.md engine_real): the model
    is loaded, and the watermark's processor built, by the engine's own thread; a load that fails raises in the
    caller's."""
    import threading

    import stillhouse.models as models
    from stillhouse.errors import StillhouseError

    seen = []
    real = models.load_local_lm

    def spy(*a, **k):
        seen.append(threading.current_thread().name)
        return real(*a, **k)

    monkeypatch.setattr(models, "load_local_lm", spy)
    e = Engine(str(tiny_models["teacher"]), max_batch=2, window_ms=0, dtype="float32")
    try:
        assert seen == ["stillhouse-engine"] and e._thread.name == "stillhouse-engine"
        assert e.submit(GenRequest(_ids(e, "Hi"), 3, temperature=0.0)).result(timeout=60).token_ids
    finally:
        e.close()
    with pytest.raises(StillhouseError, match="does not exist"):
        Engine("/nonexistent/model-dir", dtype="float32")


def test_int4_layers_compute_with_their_dequantized_groups(tmp_path):
    """`Int4Linear`: 4-bit groups of 32 with a scale and offset each, every weight within half a step of its own;
    the layer computes x @ W.T with those weights; an engine with `quantize="int4"` answers as its model does."""
    from stillhouse.models.quantize import Int4Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 48, bias=False)
    q = Int4Linear(lin)
    w = lin.weight.detach().reshape(48, 3, 32)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    deq = ((w - lo) / step).round() * step + lo  # what the kernel should compute with, before bf16 rounding
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(4, 96)
    want = x.bfloat16().float() @ deq.reshape(48, 96).T
    got = q(x.bfloat16()).float()
    assert (got - want).norm() < 0.02 * want.norm(), (got - want).norm() / want.norm()
    e = Engine(str(_real_shaped_llama(tmp_path / "m")), max_batch=4, window_ms=0, quantize="int4")
    try:
        assert e.fingerprint.endswith("-int4") and isinstance(e.model.lm_head, Int4Linear)
        g = torch.Generator().manual_seed(3)
        ps = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (9, 23, 5)]
        assert e.submit(GenRequest(ps[0], 10, temperature=0.0)).result(timeout=60).token_ids == _alone(e, ps[0], 10)
        # prompts of several lengths prefilled together: the output layer gets the last positions of a padded batch
        futs = [e.submit(GenRequest(p, 6, temperature=0.0)) for p in ps]
        assert all(len(f.result(timeout=60).token_ids) > 0 for f in futs)
    finally:
        e.close()


def test_prompts_sharing_a_beginning_prefill_it_once_and_still_match_generate(tmp_path):
    """A shared beginning (a system prompt) is found, computed once and copied into each row that starts with it:
    greedy fp32 answers still equal `generate` alone, for requests in the first admission, joining mid-decode, with
    no shared beginning, and with one token left after it."""
    # a long window: the first five arrive as one admission however slow the machine
    e = Engine(str(_real_shaped_llama(tmp_path / "m")), max_batch=16, window_ms=300, dtype="float32")
    try:
        g = torch.Generator().manual_seed(2)
        system = torch.randint(3, 49152, (40,), generator=g).tolist()
        rest = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (1, 9, 30, 4, 57, 13, 22, 2)]
        prompts = [system + r for r in rest] + [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (7, 45)]
        budgets = [14, 5, 20, 9, 12, 25, 3, 17, 10, 8]
        want = [_alone(e, p, n) for p, n in zip(prompts, budgets)]
        order = [0, 8, 1, 2, 3, 4, 9, 5, 6, 7]
        first = {i: e.submit(GenRequest(prompts[i], budgets[i], temperature=0.0)) for i in order[:5]}
        _wait_steps(e, 3)
        later = {i: e.submit(GenRequest(prompts[i], budgets[i], temperature=0.0)) for i in order[5:]}
        got = {i: f.result(timeout=120).token_ids for i, f in {**first, **later}.items()}
        assert [got[i] for i in range(len(prompts))] == want
        assert list(e.prefixes.kept) == [tuple(system)]
        assert e.prefixes.hits == 8 and e.prefixes.tokens_saved == 8 * 40  # every prompt that starts with it
    finally:
        e.close()


def test_shared_beginnings_are_kept_only_where_they_save_a_pass():
    from stillhouse.serve.batches import _Prefixes

    p = _Prefixes()
    a = tuple(range(100, 130))
    assert p.wanted(a) is None  # nothing to share with yet
    b = a[:20] + (7, 8, 9)
    assert p.wanted(b) == a[:20]
    p.keep(a[:20], [torch.zeros(50)], [torch.zeros(50)])  # 400 bytes
    assert p.longest(a) == a[:20] and p.longest(a[:20]) is None  # a prompt must keep a token to prefill
    assert p.wanted(a[:25] + (1,)) is None  # 5 tokens past a kept beginning: not worth a forward pass
    assert p.wanted(tuple(range(200, 210))) is None  # shorter than MIN_TOKENS in common with anything
    long = tuple(range(5000, 7000))  # a long system prompt, found to the token
    assert p.wanted(long + (1,)) is None and p.wanted(long + (2, 3)) == long
    p.MAX_BYTES = 1000
    p.keep(tuple(range(300, 340)), [torch.zeros(100)], [torch.zeros(100)])  # 800 more: the older goes
    assert list(p.kept) == [tuple(range(300, 340))]  # the least recently used went past MAX_BYTES


def test_the_prefix_cache_can_be_turned_off(tiny_models):
    e = Engine(str(tiny_models["teacher"]), max_batch=8, window_ms=50, dtype="float32", prefix_cache=False)
    try:
        prompts = [_ids(e, p) for p in PROMPTS]
        got = [f.result(timeout=60).token_ids for f in [e.submit(GenRequest(i, 6, temperature=0.0)) for i in prompts]]
        assert got == [_alone(e, i, 6) for i in prompts]
        assert e.prefixes is None and e._batch.prefixes is None
    finally:
        e.close()


def test_the_chunked_output_layer_computes_the_linear_layer_it_replaces():
    from stillhouse.models.output import ChunkedOutputLinear, speed_up_output

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 5000, bias=True)  # a vocabulary that is not a whole number of chunks
    head = ChunkedOutputLinear(lin)
    assert head.weight is lin.weight  # shared, so a tied embedding stays tied
    with torch.inference_mode():
        for shape in [(1, 64), (2, 64), (7, 1, 64), (3, 33, 64), (130, 64)]:
            x = torch.randn(*shape)
            got, want = head(x), torch.nn.functional.linear(x, lin.weight, lin.bias)
            assert got.shape == want.shape and got.is_contiguous()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    class Tiny(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def get_output_embeddings(self):
            return self.head

        def set_output_embeddings(self, new):
            self.head = new

    big = Tiny(torch.nn.Linear(8, 8192, bias=False))
    assert speed_up_output(big) and isinstance(big.head, ChunkedOutputLinear)
    assert not speed_up_output(big)  # already done
    assert not speed_up_output(Tiny(torch.nn.Linear(8, 8192, bias=False).to(torch.bfloat16)))  # F.linear is as fast
    assert not speed_up_output(Tiny(torch.nn.Linear(8, 1000, bias=False)))  # a small vocabulary gains nothing
