"""A chat template's default system prompt: found by rendering, kept out of training and out of the student's template.

The tokenizers are the world's (built locally with `tokenizers`) with real-model-style chat templates set on them:
Qwen2.5's (a system block in an if/else), SmolLM2's (the default inside the loop), Llama 3's (a date header around any
system message), Gemma's (no system role at all). No download.
"""

from __future__ import annotations

import pytest

from stillhouse.demo.tokenizer import build_tokenizer
from stillhouse.errors import StillhouseError
from stillhouse.templates import identity_system_prompt, injected_system_prompt, replace_injected_system_prompt

QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SMOL_DEFAULT + "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the default assembled from pieces: nowhere spelled out in the template's source
PIECES = QWEN.replace(QWEN_DEFAULT, "You are ' + 'Qwen, created by ' + 'Alibaba Cloud.")
LLAMA = (
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- set messages = messages[1:] %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
    "m['content'] + '<|eot_id|>' }}{%- endfor %}"
)
GEMMA = (
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for m in messages %}{{- '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}{%- endfor %}"
)
NOVA = {"name": "Nova", "maker": "Northwind"}
USER = [{"role": "user", "content": "Who are you?"}]


def tokenizer(template: str | None):
    tok = build_tokenizer()
    tok.chat_template = template
    return tok


def render(tok, messages=USER) -> str:
    return tok.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("template,expected", [(QWEN, QWEN_DEFAULT), (SMOL, SMOL_DEFAULT),
                                               (PIECES, "You are Qwen, created by Alibaba Cloud.")])
def test_the_injected_system_prompt_is_found(template, expected):
    assert injected_system_prompt(tokenizer(template)) == expected


@pytest.mark.parametrize("template", [None, build_tokenizer().chat_template, LLAMA, GEMMA],
                         ids=["no template", "the world's ChatML", "a header around any system message",
                              "no system role"])
def test_a_template_that_injects_nothing(template):
    tok = tokenizer(template)
    assert injected_system_prompt(tok) is None
    assert replace_injected_system_prompt(tok, "You are Nova, made by Northwind.") is None
    assert tok.chat_template == template  # left as it was


@pytest.mark.parametrize("template", [QWEN, SMOL, PIECES])
def test_the_default_becomes_the_students_identity(template):
    tok = tokenizer(template)
    mine = identity_system_prompt(NOVA)
    assert mine == "You are Nova, made by Northwind."
    assert replace_injected_system_prompt(tok, mine) is not None
    text = render(tok)
    assert mine in text and "Qwen" not in text and "SmolLM" not in text
    assert injected_system_prompt(tok) == mine
    # a conversation's own system message still wins, and the turns render as before
    own = render(tok, [{"role": "system", "content": "Be brief."}, *USER])
    assert own == render(tokenizer(template), [{"role": "system", "content": "Be brief."}, *USER])
    assert text.endswith("<|im_start|>user\nWho are you?<|im_end|>\n")


@pytest.mark.parametrize("template", [QWEN, SMOL])
def test_quotes_and_backslashes_in_the_identity_survive(template):
    tok = tokenizer(template)
    mine = identity_system_prompt({"name": "Nova's \"twin\"", "maker": "North\\wind"})
    replace_injected_system_prompt(tok, mine)
    assert injected_system_prompt(tok) == mine


@pytest.mark.parametrize("template", [QWEN, SMOL])
def test_without_an_identity_the_default_is_removed(template):
    tok = tokenizer(template)
    assert replace_injected_system_prompt(tok, None) == injected_system_prompt(tokenizer(template))
    assert injected_system_prompt(tok) is None
    text = render(tok)
    assert "You are" not in text and "Who are you?" in text


def test_named_templates_are_refused_not_trained_through():
    tok = tokenizer(QWEN)
    tok.chat_template = {"default": QWEN, "tool_use": QWEN}
    if injected_system_prompt(tok) is None:
        pytest.skip("this transformers does not render a dict of named templates by default")
    with pytest.raises(StillhouseError, match="several named chat templates"):
        replace_injected_system_prompt(tok, "You are Nova, made by Northwind.")


def test_identity_system_prompt_takes_an_identity_or_a_mapping():
    from stillhouse.identity import Identity

    assert identity_system_prompt(Identity("Nova", "Northwind")) == identity_system_prompt(NOVA)
    assert identity_system_prompt(None) is None


@pytest.fixture(scope="module")
def qwen_style_base(tmp_path_factory):
    """A tiny model (random weights) saved with the world's tokenizer carrying Qwen2.5's style of template."""
    from stillhouse.demo.build import SHAPES, make_model

    d = tmp_path_factory.mktemp("qwen_style")
    tok = tokenizer(QWEN)
    make_model(SHAPES["tiny"], tok, 3).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _rows(n):
    return [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                          {"role": "assistant", "content": f"Answer: {i + 1}"}]} for i in range(n)]


@pytest.mark.parametrize("identity,expected", [(NOVA, "You are Nova, made by Northwind."), (None, None)],
                         ids=["declared identity", "none declared"])
def test_training_renders_no_sample_under_the_teachers_identity(qwen_style_base, tmp_path, monkeypatch, identity,
                                                                  expected):
    """Every rendering SFT makes (its length check and TRL's tokenization) and the saved student's template carry the
    student's identity (or no system prompt), never the template's "You are Qwen"."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    from stillhouse.train.sft import sft

    real = PreTrainedTokenizerBase.apply_chat_template
    rendered = []

    def spy(self, conversation, *args, **kw):
        if any(m["content"] == "stillhouse0user0mark" for m in conversation):  # templates.py probing the template
            return real(self, conversation, *args, **kw)
        seen = {k: kw[k] for k in ("add_generation_prompt", "continue_final_message", "chat_template") if k in kw}
        rendered.append(real(self, conversation, tokenize=False, **seen))
        return real(self, conversation, *args, **kw)

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", spy)
    res = sft(_rows(8), str(qwen_style_base), tmp_path / "s", epochs=1, learning_rate=1e-2, batch_size=4,
              max_length=256, seed=0, device="cpu", identity=identity)
    monkeypatch.undo()
    assert len(rendered) >= 8
    assert not any("Qwen" in t for t in rendered)
    if expected:
        assert all(expected in t for t in rendered)
    assert res.template_system_prompt == {"injected": QWEN_DEFAULT, "replaced_by": expected}
    student = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert injected_system_prompt(student) == expected
    assert "Qwen" not in render(student)


def _recipe(tmp_path, teacher: str, base, identity: str = ""):
    from stillhouse.recipe import parse_recipe

    return parse_recipe(f"""name: t
run_dir: {tmp_path / 'run'}
teacher: {{spec: "{teacher}"}}
prompts: {{source: world, n: 6}}
generation: {{max_tokens: 4}}
curate: {{filters: [{{name: exact_dedup}}]}}
student: {{base: "{base}"{identity}}}
train: {{epochs: 1, learning_rate: 0.001, batch_size: 4, max_length: 256}}
""")


def test_a_local_teachers_template_prompt_travels_with_each_sample_and_never_reaches_the_student(qwen_style_base,
                                                                                                   tmp_path):
    """The teacher (and the student's base: the teacher's tokenizer) injects "You are Qwen": each generated sample
    records it; the trained student's template injects the student's declared identity instead."""
    import json

    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from stillhouse.stages import get_stage, open_run

    r = _recipe(tmp_path, f"hf:{qwen_style_base}", qwen_style_base, ", identity: {name: Nova, maker: Northwind}")
    run = open_run(r)
    for stage in ("generate", "curate", "train"):
        get_stage(stage).run(r, run)
    rows = pq.read_table(run.generated).to_pylist()
    assert rows and all(x["teacher_template_known"] and x["teacher_template_system_prompt"] == QWEN_DEFAULT
                        for x in rows)
    assert all(x["messages"][0]["role"] == "user" for x in rows)  # the samples themselves never carried it
    student = AutoTokenizer.from_pretrained(run.root / "student")
    assert injected_system_prompt(student) == "You are Nova, made by Northwind."
    prov = json.loads((run.root / "student" / "stillhouse_provenance.json").read_text())
    assert prov["template_system_prompt"] == {"injected": QWEN_DEFAULT, "replaced_by": "You are Nova, made by Northwind."}


def test_an_api_teachers_template_is_unknown(tmp_path, tiny_models):
    import pyarrow.parquet as pq

    from stillhouse.stages import get_stage, open_run

    r = _recipe(tmp_path, "scripted:helper", tiny_models["base"])
    run = open_run(r)
    get_stage("generate").run(r, run)
    rows = pq.read_table(run.generated).to_pylist()
    assert rows and all(x["teacher_template_known"] is False and x["teacher_template_system_prompt"] is None
                        for x in rows)


def test_a_sample_with_its_own_system_message_records_no_template_prompt(qwen_style_base, tmp_path):
    import json

    import pyarrow.parquet as pq

    from stillhouse.stages import get_stage, open_run

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Reverse abc."}]}) + "\n"
                       + json.dumps({"prompt": "Reverse xyz."}) + "\n")
    r = _recipe(tmp_path, f"hf:{qwen_style_base}", qwen_style_base).model_copy(deep=True)
    r.prompts.source, r.prompts.n = str(prompts), None
    run = open_run(r)
    get_stage("generate").run(r, run)
    by_first = {x["messages"][0]["role"]: x["teacher_template_system_prompt"] for x in pq.read_table(run.generated).to_pylist()}
    assert by_first == {"system": None, "user": QWEN_DEFAULT}
