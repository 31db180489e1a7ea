"""A character-level tokenizer for the tiny world, built locally with `tokenizers`.

Characters, not BPE merges: the world's tasks are letter edits, and a model that sees one
letter per token learns them in minutes. Saved in Hugging Face format with a ChatML chat
template, so `AutoTokenizer.from_pretrained(dir)` and `apply_chat_template` work on it.
"""

from __future__ import annotations


from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, IM_START, IM_END, UNK = "<|pad|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

# ChatML; the prompt-then-completion rendering is a prefix of the full rendering, which
# TRL's completion-only loss relies on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The world's tokenizer: specials, the two think tags, newline and printable ASCII."""
    chars = ["\n"] + [chr(i) for i in range(32, 127)]
    specials = [PAD, UNK, IM_START, IM_END]
    vocab = {tok: i for i, tok in enumerate(specials + [THINK_OPEN, THINK_CLOSE] + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
        additional_special_tokens=[IM_START], model_max_length=256,
    )
    # The think tags are ordinary (non-special) added tokens, so decoding keeps them.
    tok.add_tokens([THINK_OPEN, THINK_CLOSE])
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok
