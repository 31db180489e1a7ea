"""Models from GGUF files: a tiny Llama written to GGUF here (never downloaded), loaded back through resolve_model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from stillhouse.errors import StillhouseError  # noqa: E402
from stillhouse.models import gguf as gg  # noqa: E402
from stillhouse.models import load_local_lm, resolve_model  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the cat sat on the mat", "What is 12 + 30? It is 42.", "hello, world!\nnew lines\tand tabs", "ünïcödé ok"]


def _tokenizer():
    """A byte-level BPE tokenizer trained here on a few sentences, wrapped for transformers, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = TEMPLATE
    return tok, tk


def _model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that a dropped or misnamed norm shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k rows (its convert_hf_to_gguf.py `permute`), which GGUF readers undo."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tk, qtype=None) -> None:
    """The model and tokenizer as llama.cpp's converter writes a Llama: metadata, vocabulary, tensors."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tk.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tk.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])  # 3: control
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        base, suffix = hf_name.rsplit(".", 1)
        arr = t.float().numpy()
        if "self_attn.q_proj" in hf_name:
            arr = _permute(arr, cfg.num_attention_heads)
        elif "self_attn.k_proj" in hf_name:
            arr = _permute(arr, cfg.num_key_value_heads)
        name = f"{names.get_name(base)}.{suffix}"
        if qtype is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    tok, tk = _tokenizer()
    model = _model(len(tok))
    write_gguf(root / "tiny.gguf", model, tk)
    (root / "q8").mkdir()
    write_gguf(root / "q8" / "tiny-q8_0.gguf", model, tk, gguf.GGMLQuantizationType.Q8_0)
    return {"root": root, "tok": tok, "model": model, "file": root / "tiny.gguf", "q8": root / "q8" / "tiny-q8_0.gguf"}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STILLHOUSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def _logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return lm(torch.tensor([ids])).logits


def test_gguf_file_loads_as_the_model_it_was_written_from(tiny, cache, monkeypatch):
    from transformers import AutoTokenizer

    d = Path(resolve_model(str(tiny["file"])))
    sha = hashlib.sha256(tiny["file"].read_bytes()).hexdigest()
    assert d == cache / sha[:16]
    record = json.loads((d / gg.MARKER).read_text())
    assert record["sha256"] == sha and record["size"] == tiny["file"].stat().st_size
    assert record["dtype"] == "float32" and record["source"] == str(tiny["file"].resolve())
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary directory left behind

    tok = AutoTokenizer.from_pretrained(d)
    msgs = [{"role": "user", "content": "What is 12 + 30?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tiny["tok"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    for text in TEXTS:
        assert tok(text)["input_ids"] == tiny["tok"](text)["input_ids"], text
    assert tok.eos_token == "<|im_end|>"

    ids = tiny["tok"]("the cat sat on the mat. What is 12 + 30?")["input_ids"]
    with torch.no_grad():
        want = tiny["model"](torch.tensor([ids])).logits
    torch.testing.assert_close(_logits(d, ids), want, atol=1e-5, rtol=1e-5)

    # the second time, and for the same bytes anywhere (a copy, a directory holding it), the cache is used as is
    monkeypatch.setattr(gg, "_convert", lambda *a: pytest.fail("converted again"))
    assert Path(resolve_model(str(tiny["file"]))) == d
    other = tiny["root"] / "elsewhere"
    other.mkdir(exist_ok=True)
    shutil.copy(tiny["file"], other / "renamed.gguf")
    assert Path(resolve_model(str(other))) == d
    tokenizer, lm, fingerprint = load_local_lm(str(other / "renamed.gguf"), "cpu", log=lambda _: None)
    assert fingerprint and fingerprint.startswith("fp_") and lm.config.num_key_value_heads == 2


def test_quantized_gguf_is_dequantized_and_saved(tiny, cache):
    d = Path(resolve_model(str(tiny["q8"].parent)))  # a directory holding one .gguf names it
    record = json.loads((d / gg.MARKER).read_text())
    assert record["dtype"] == "float16" and "Q8_0" in record["gguf_tensor_types"]
    ids = tiny["tok"]("What is 12 + 30? It is 42.")["input_ids"]
    with torch.no_grad():
        want = tiny["model"](torch.tensor([ids])).logits
    got = _logits(d, ids)
    assert (got - want).abs().max() < 0.05  # 8-bit blocks: close, not equal
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_gguf_through_the_hf_teacher_backend(tiny, cache):
    from stillhouse.teachers import Request
    from stillhouse.teachers.hf import HFBackend, HFOptions

    backend = HFBackend(str(tiny["file"]), HFOptions(device="cpu", dtype="float32"))
    try:
        (i, c), = list(backend.generate([Request(messages=({"role": "user", "content": "hi"},), max_tokens=4)]))
        assert i == 0 and c.completion_tokens >= 1 and c.system_fingerprint.startswith("fp_")
    finally:
        backend.close()


def test_bad_gguf_files_get_one_clear_message(tiny, cache, tmp_path, monkeypatch):
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    with pytest.raises(StillhouseError, match="junk.gguf.*not a GGUF file"):
        resolve_model(str(junk))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny["file"].read_bytes()[:300])  # the magic, then a truncated header
    with pytest.raises(StillhouseError, match="cut.gguf"):
        resolve_model(str(cut))
    with pytest.raises(StillhouseError, match="missing.gguf.*does not exist"):
        resolve_model(str(tmp_path / "missing.gguf"))
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(tiny["file"], two / "a.gguf")
    shutil.copy(tiny["file"], two / "b.gguf")
    with pytest.raises(StillhouseError, match="2 .gguf files"):
        resolve_model(str(two))
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name.startswith(".")]

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(StillhouseError, match=r"pip install 'stillhouse\[gguf\]'"):
        resolve_model(str(tiny["file"]))


def test_a_half_written_cache_is_never_used(tiny, cache):
    sha = hashlib.sha256(tiny["file"].read_bytes()).hexdigest()
    out = cache / sha[:16]
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")  # a damaged directory: no record of a finished conversion
    abandoned = cache / f".{sha[:16]}.dead"
    abandoned.mkdir()
    (abandoned / ".pid").write_text(str(2**22 + 12345))  # beyond pid_max's default: no such process
    d = Path(resolve_model(str(tiny["file"])))
    assert d == out and json.loads((d / gg.MARKER).read_text())["sha256"] == sha
    assert (d / "model.safetensors").is_file() and not abandoned.exists()
    assert sorted(p.name for p in cache.iterdir()) == [out.name]
    assert os.listdir(d)
