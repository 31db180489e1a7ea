import pytest

from stillhouse.errors import StillhouseError
from stillhouse.teachers import Request, known_backends, load_backend, parse_spec, split_reasoning


def _reqs(n, **kw):
    return [Request(messages=({"role": "user", "content": f"What is {i} + 1?"},), max_tokens=8, **kw) for i in range(n)]


def test_registry_and_spec_errors():
    assert "hf" in known_backends()
    assert parse_spec("hf:/x/y") == ("hf", "/x/y")
    with pytest.raises(ValueError, match="did you mean 'hf'"):
        parse_spec("hg:/x")
    with pytest.raises(ValueError, match="BACKEND:MODEL"):
        parse_spec("justamodel")


def test_hf_backend_each_request_once_and_deterministic(tiny_models):
    b = load_backend(f"hf:{tiny_models['teacher']}", {"batch_size": 3})
    reqs = _reqs(7)
    first = dict(b.generate(reqs))
    assert sorted(first) == list(range(7))
    again = dict(b.generate(reqs))
    assert {i: c.text for i, c in first.items()} == {i: c.text for i, c in again.items()}
    c = first[0]
    assert c.completion_tokens >= 1 and c.prompt_tokens > 5 and c.finish_reason in ("stop", "length")
    assert c.model == str(tiny_models["teacher"]) and c.system_fingerprint.startswith("fp_")


def test_hf_backend_sampling_is_seeded(tiny_models):
    b = load_backend(f"hf:{tiny_models['teacher']}", {})
    a = [c.text for _, c in sorted(b.generate(_reqs(4, temperature=1.0, seed=1)))]
    a2 = [c.text for _, c in sorted(b.generate(_reqs(4, temperature=1.0, seed=1)))]
    other = [c.text for _, c in sorted(b.generate(_reqs(4, temperature=1.0, seed=2)))]
    greedy = [c.text for _, c in sorted(b.generate(_reqs(4)))]
    assert a == a2 and (a != other or a != greedy)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(StillhouseError, match="does not exist"):
        load_backend(f"hf:{tmp_path}/nope", {})
    with pytest.raises(StillhouseError, match="no packaged model 'nope'"):
        load_backend("hf:stillhouse:nope", {})


def test_split_reasoning():
    assert split_reasoning("<think>because</think>\nAnswer: 1") == ("because", "Answer: 1")
    assert split_reasoning("Answer: 1") == (None, "Answer: 1")


def test_hf_backend_top_k_logprobs(tiny_models):
    import math

    b = load_backend(f"hf:{tiny_models['teacher']}", {"top_logprobs": 3})
    (_, c), = list(b.generate(_reqs(1)))
    lp = c.extra["logprobs"]
    assert len(lp) == c.completion_tokens
    for step in lp:
        assert len(step["top_logprobs"]) == 3
        assert step["top_logprobs"][0]["logprob"] >= step["top_logprobs"][1]["logprob"]
        assert step["logprob"] <= 0 and math.isclose(step["logprob"], step["top_logprobs"][0]["logprob"], abs_tol=1e-4)


def test_hf_backend_goes_through_the_ledger(tiny_models, tmp_path):
    from tests.conftest import generate
    from stillhouse.calls import Ledger
    from stillhouse.stages import open_run
    from stillhouse.recipe import parse_recipe

    r = parse_recipe(f"name: h\nrun_dir: {tmp_path / 'run'}\nteacher: {{spec: 'hf:{tiny_models['teacher']}'}}\n"
                     f"prompts: {{n: 6}}\ngeneration: {{max_tokens: 4}}\nstudent: {{base: x}}\n")
    generate(r, open_run(r))
    m = generate(r, open_run(r), force=True)
    assert m["counts"]["cache_hits"] == 6 and m["counts"]["calls_made"] == 0
    assert Ledger(tmp_path / "run" / "ledger.db").stats()["calls"] == 6


def test_cache_identity_of_a_local_model_follows_its_weights(tiny_models, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    from stillhouse.teachers import answer_identity

    d = tmp_path / "m"
    shutil.copytree(tiny_models["teacher"], d)
    before = answer_identity(f"hf:{d}", {})
    assert before == answer_identity(f"hf:{d}", {}) and before["weights"].startswith("fp_")
    AutoModelForCausalLM.from_pretrained(tiny_models["base"]).save_pretrained(d)  # retrained in place
    assert answer_identity(f"hf:{d}", {})["weights"] != before["weights"]
    assert answer_identity("openai:gpt-4o-mini", {})["model"] == "gpt-4o-mini"
    assert "quantize" not in before  # identities of unquantized models are what they were before quantize existed
    for method in ("int8", "int4"):
        q = answer_identity(f"hf:{d}", {"quantize": method})
        assert q["quantize"] == method and q["dtype"] == "bfloat16" and q != answer_identity(f"hf:{d}", {})


def test_quantized_models_compute_in_bf16_and_refuse_float32(monkeypatch):
    """int8/int4 weights compute in bf16: auto picks it even on a CPU without native bf16 (and the log says it is
    slower there), float32 is refused, and an unknown method names the ones there are."""
    from stillhouse import models as hf
    from stillhouse.errors import StillhouseError

    monkeypatch.setattr(hf, "cpu_flags", lambda: frozenset({"avx2"}))
    name, why = hf.quantized_dtype("cpu", "auto", "int8")
    assert name == "bfloat16" and "no native bf16" in why and "slower than where bf16 is native" in why
    assert hf.quantized_dtype("cpu", "auto", "none")[0] == "float32"
    with pytest.raises(StillhouseError, match="cannot be combined with --dtype float32"):
        hf.quantized_dtype("cpu", "float32", "int4")
    with pytest.raises(StillhouseError, match="one of none, int8, int4, not 'int2'"):
        hf.quantized_dtype("cpu", "auto", "int2")


def test_compute_dtype_fits_the_hardware_not_the_checkpoint(monkeypatch, tiny_models):
    """A CPU without native bf16 computes in fp32 even for a bf16 checkpoint; one with it in bf16; asking wins."""
    import torch

    from stillhouse import models as hf  # loading lives in stillhouse.models (teachers.hf re-exports it)

    monkeypatch.setattr(hf, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))  # e.g. Zen 1-3, Skylake-X
    assert hf.compute_dtype("cpu")[0] == "float32"
    logs: list[str] = []
    _, lm, _ = hf.load_local_lm("stillhouse:atlas", "cpu", log=logs.append)  # shipped as bf16
    assert lm.dtype == torch.float32 and "float32" in logs[0] and "no native bf16" in logs[0]
    monkeypatch.setattr(hf, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))  # e.g. Zen 4, Sapphire Rapids
    assert hf.compute_dtype("cpu") == ("bfloat16", "this CPU has native bf16 (avx512_bf16)")
    assert hf.compute_dtype("cpu", "float32") == ("float32", "asked for")
    monkeypatch.setattr(hf, "cpu_flags", lambda: frozenset())
    _, lm, _ = hf.load_local_lm(str(tiny_models["teacher"]), "cpu", dtype="bfloat16", log=logs.append)
    assert lm.dtype == torch.bfloat16
