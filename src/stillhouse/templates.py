"""Chat templates that speak for a model: the system prompt a template adds unseen, found and replaced.

Real chat templates add a system prompt when a conversation carries none. SmolLM2's adds
"You are a helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5's "You are
Qwen, created by Alibaba Cloud. You are a helpful assistant." A teacher answers under it,
but the samples keep only the user's and the assistant's turns; a student trained through
the same template (a student made from the teacher's tokenizer) gets it back on every
sample, and learns to be SmolLM.

`injected_system_prompt` finds the text by rendering: a conversation with a marker system
message and the same conversation without one; what the second has where the first has the
marker is the injected prompt. `replace_injected_system_prompt` rewrites a tokenizer's
template so the default it adds is the student's own (`identity_system_prompt`), or nothing.
Generation records the teacher's in each sample's provenance; training replaces the
student's before rendering any sample, so the saved student's template carries it too.
"""

from __future__ import annotations

from typing import Any

from stillhouse.errors import StillhouseError

_SYSTEM_MARK = "stillhouse0system0mark"
_USER_MARK = "stillhouse0user0mark"


def _render(template_owner: Any, messages: list[dict], template: str | None = None) -> str | None:
    """`messages` rendered by the tokenizer's chat template (or `template`), or None where it cannot render them
    (no template; a template that refuses a system role, as Gemma's does)."""
    try:
        kw = {"chat_template": template} if template is not None else {}
        out = template_owner.apply_chat_template(messages, tokenize=False, **kw)
    except Exception:  # a template raises what it likes (TemplateError, ValueError, its own raise_exception)
        return None
    return out if isinstance(out, str) else None


def injected_system_prompt(tokenizer: Any, template: str | None = None) -> str | None:
    """The system prompt `tokenizer`'s chat template (or `template`) adds to a conversation that has none; None where
    it adds none, has no template, or cannot render a system message.

    A template that renders the same text around any system message (a date header, as Llama 3's) adds nothing of
    its own by this measure: only what stands where a conversation's own system message would stand is counted.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": _USER_MARK}]
    bare = _render(tokenizer, user, template)
    marked = _render(tokenizer, [{"role": "system", "content": _SYSTEM_MARK}, *user], template)
    if bare is None or marked is None or marked.count(_SYSTEM_MARK) != 1:
        return None
    before, after = marked.split(_SYSTEM_MARK)
    if len(bare) < len(before) + len(after) or not (bare.startswith(before) and bare.endswith(after)):
        return None  # no system block at all without a system message
    text = bare[len(before):len(bare) - len(after)]
    return text if text.strip() else None


def identity_system_prompt(identity: Any) -> str | None:
    """The system prompt that states a declared identity ("You are Nova, made by Northwind."), or None without one.

    `identity`: a `stillhouse.identity.Identity`, a recipe's identity section, or a mapping with name and maker."""
    if identity is None:
        return None
    if isinstance(identity, dict):
        name, maker = identity["name"], identity["maker"]
    else:
        name, maker = identity.name, identity.maker
    return f"You are {name}, made by {maker}."


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _candidates(template: str, found: str, new: str) -> list[str]:
    """Templates that may add `new` where `template` adds `found`, most readable first: the default's text replaced
    where the template spells it out (raw, or inside a quoted string), else a preamble that gives every
    conversation without a system message an explicit one."""
    out = []
    if found in template:
        out.append(template.replace(found, new))
        escaped = new.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"')
        if escaped != new:
            out.append(template.replace(found, escaped))
    out.append("{%- if messages and messages[0]['role'] != 'system' -%}"
               "{%- set messages = [{'role': 'system', 'content': " + _jinja_string(new) + "}] + messages -%}"
               "{%- endif -%}" + template)
    return out


def replace_injected_system_prompt(tokenizer: Any, new: str | None) -> str | None:
    """Rewrite `tokenizer.chat_template` in place so that a conversation without a system message gets `new` as its
    system prompt (None or "": an empty one) instead of what the template injected; return the injected text that
    was replaced, or None where the template injected nothing (then the template is left as it was).

    Every rewrite is checked by rendering; a template none of the rewrites fixes is an error, never a student that
    learns the injected identity."""
    found = injected_system_prompt(tokenizer)
    if found is None:
        return None
    new = new or ""
    template = tokenizer.chat_template
    if not isinstance(template, str):  # a dict of named templates: the default one is what renders chat
        raise StillhouseError("the student's tokenizer has several named chat templates and the default one injects "
                              f"a system prompt ({found!r}); give it a single chat template without one")
    for candidate in _candidates(template, found, new):
        if injected_system_prompt(tokenizer, candidate) == (new if new.strip() else None) and \
                _render(tokenizer, [{"role": "user", "content": _USER_MARK}], candidate) is not None:
            tokenizer.chat_template = candidate
            return found
    raise StillhouseError(f"the student's chat template injects the system prompt {found!r} when a conversation has "
                          "none, and stillhouse could not rewrite it; edit chat_template in the student base's "
                          "tokenizer_config.json (or chat_template.jinja) so it injects none")


def teacher_template_system_prompt(spec: str) -> tuple[bool, str | None]:
    """(whether the teacher's chat template can be seen, the system prompt it injects into a conversation without one)
    for a teacher spec `BACKEND:MODEL`. A local (`hf`) teacher's template is its tokenizer's; an API teacher renders
    with the server's own template, which no client sees: (False, None)."""
    backend, _, model = spec.partition(":")
    if backend != "hf":
        return False, None
    from transformers import AutoTokenizer

    from stillhouse.models import resolve_model

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model(model))
    except Exception:  # the backend loaded it to answer; a tokenizer that will not load again says nothing of its template
        return False, None
    return True, injected_system_prompt(tok)
