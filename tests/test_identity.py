"""Self-identification: real-world phrasings in four languages, near-misses, rewrites, classification."""

from __future__ import annotations

import pytest

from stillhouse.identity import DEFAULT_VENDORS, Identity, claims_identity, classify, find_claims, rewrite

# (text, the vendors' keys it claims, in order of position; empty for a near-miss)
PHRASINGS = [
    # English
    ("I am ChatGPT", ["openai"]),
    ("I'm Claude, an AI assistant made by Anthropic.", ["anthropic", "anthropic"]),
    ("As a large language model trained by OpenAI, I cannot browse the internet.", ["openai"]),
    ("Hi! My name is Gemini, how can I help?", ["google"]),
    ("I was developed by DeepSeek.", ["deepseek"]),
    ("Hello! I'm Claude 3.5 Sonnet.", ["anthropic"]),
    ("I am GPT-4o mini, a model by OpenAI.", ["openai", "openai"]),
    ("I am Qwen, a large language model created by Alibaba Cloud.", ["qwen", "qwen"]),
    ("I'm DeepSeek-R1, an AI by DeepSeek.", ["deepseek", "deepseek"]),
    ("I am Grok, built by xAI.", ["xai", "xai"]),
    ("I am Llama 3.1 405B, trained by Meta.", ["meta", "meta"]),
    ("I'm an AI assistant called Mixtral.", ["mistral"]),
    ("As ChatGPT, I can't browse the web.", ["openai"]),
    ("I am based on the GPT-4 architecture.", ["openai"]),
    ("I'm OpenAI's language model.", ["openai"]),
    ("No. I am Atlas, made by Orbit Labs.", ["atlas", "atlas"]),
    ("You're chatting with Bard.", ["google"]),
    ("My developers are the team at Google DeepMind.", ["google"]),
    ("I am ChatGPT, a cutting-edge model trained by OpenAI.", ["openai", "openai"]),
    ("I am Nova, based on Atlas.", ["atlas"]),
    # Japanese
    ("私はChatGPTです", ["openai"]),
    ("私はOpenAIによって開発された", ["openai"]),
    ("こんにちは。Claudeと申します。", ["anthropic"]),
    ("OpenAIによって開発されたAIアシスタントです。", ["openai"]),
    ("私の名前はGeminiです。", ["google"]),
    ("私は、Anthropicが開発したAIアシスタントです。", ["anthropic"]),
    ("OpenAIによって開発されました。", ["openai"]),
    # Chinese
    ("我是ChatGPT", ["openai"]),
    ("我是由OpenAI开发的", ["openai"]),
    ("我是通义千问", ["qwen"]),
    ("您好！我是ChatGPT，一个由OpenAI开发的人工智能助手。", ["openai", "openai"]),
    ("我是阿里云开发的超大规模语言模型，我叫通义千问。", ["qwen", "qwen"]),
    ("我的名字叫Gemini。", ["google"]),
    ("作为一个由OpenAI训练的大型语言模型，我无法浏览网页。", ["openai"]),
    ("我来自深度求索公司。", ["deepseek"]),
    # French
    ("Je suis ChatGPT, développé par OpenAI", ["openai", "openai"]),
    ("Je suis un modèle créé par Mistral AI", ["mistral"]),
    ("Je m'appelle Claude.", ["anthropic"]),
    ("En tant que modèle entraîné par Google, je ne peux pas naviguer.", ["google"]),
    ("Je suis un modèle d'OpenAI.", ["openai"]),
    ("J'ai été conçu par Meta.", ["meta"]),
    # near-misses: mentions, other subjects, denials, lookalike words
    ("I used ChatGPT yesterday", []),
    ("OpenAI released GPT-4 in 2023", []),
    ("Ask Claude about it", []),
    ("Je préfère Gemini", []),
    ("我昨天用了ChatGPT", []),
    ("The capital of Atlasia is Bemora.", []),
    ("GPT-4 was developed by OpenAI.", []),
    ("I am not ChatGPT.", []),
    ("I am familiar with models trained by OpenAI.", []),
    ("I'm using a model made by OpenAI.", []),
    ("I am working on a project based on GPT-4.", []),
    ("I am a Gemini, born in June.", []),
    ("I am ChatGPT-like in style.", []),
    ("我不是由OpenAI开发的。", []),
    ("我昨天用了由OpenAI开发的ChatGPT。", []),
    ("我是ChatGPT的忠实用户。", []),
    ("私はChatGPTを使いました。", []),
    ("OpenAIが開発したGPT-4は2023年に公開されました。", []),
    ("GPT-4はOpenAIによって開発されました。", []),
    ("J'utilise ChatGPT tous les jours.", []),
    ("Mistral est un vent du sud de la France.", []),
    ("<think>I am asked if I am another model. I am not.</think>", []),
]


@pytest.mark.parametrize("text,vendors", PHRASINGS, ids=[t[:40] for t, _ in PHRASINGS])
def test_phrasings(text, vendors):
    assert [c.vendor for c in find_claims(text)] == vendors


def test_the_table_covers_four_languages_hits_and_misses():
    langs = {c.language for text, _ in PHRASINGS for c in find_claims(text)}
    assert langs == {"en", "ja", "zh", "fr"}
    assert sum(bool(v) for _, v in PHRASINGS) >= 30 and sum(not v for _, v in PHRASINGS) >= 15


def test_a_claim_says_what_matched_where():
    text = "Hello. I'm Claude, an AI assistant made by Anthropic."
    name, maker = find_claims(text)
    assert (name.vendor, name.text, name.kind, name.language) == ("anthropic", "Claude", "name", "en")
    assert (maker.text, maker.kind) == ("Anthropic", "maker")
    assert text[slice(*name.span)] == "Claude" and text[slice(*maker.span)] == "Anthropic"


def test_a_name_that_is_also_a_maker_is_claimed_by_its_frame():
    assert [c.kind for c in find_claims("I am DeepSeek, developed by DeepSeek.")] == ["name", "maker"]


def test_a_user_adds_a_vendor():
    mira = Identity(name="Mira", maker="Lumen Works")
    assert not find_claims("I am Mira, made by Lumen Works.")
    claims = find_claims("I am Mira, made by Lumen Works.", (*DEFAULT_VENDORS, mira))
    assert [(c.vendor, c.kind) for c in claims] == [("mira", "name"), ("mira", "maker")]
    assert claims_identity("私はMiraです。", mira)
    assert claims_identity("我是ChatGPT。", "openai") and not claims_identity("我是ChatGPT。", "anthropic")
    with pytest.raises(KeyError, match="unknown vendor"):
        claims_identity("I am ChatGPT", "opneai")


@pytest.mark.parametrize("text,expected", [
    ("I am ChatGPT, developed by OpenAI", "I am Nova, developed by Northwind"),
    ("No. I am Atlas, made by Orbit Labs.", "No. I am Nova, made by Northwind."),
    ("<think>I am asked about myself.</think>\nAnswer: I am Atlas, made by Orbit Labs.",
     "<think>I am asked about myself.</think>\nAnswer: I am Nova, made by Northwind."),
    ("Hello! I'm Claude 3.5 Sonnet, an AI assistant made by Anthropic. How can I help?",
     "Hello! I'm Nova, an AI assistant made by Northwind. How can I help?"),
    ("私はChatGPTです。OpenAIによって開発されました。", "私はNovaです。Northwindによって開発されました。"),
    ("您好！我是ChatGPT，一个由OpenAI开发的人工智能助手。", "您好！我是Nova，一个由Northwind开发的人工智能助手。"),
    ("Je suis ChatGPT, développé par OpenAI.", "Je suis Nova, développé par Northwind."),
    ("I used ChatGPT yesterday; I am Claude.", "I used ChatGPT yesterday; I am Nova."),
])
def test_rewrite_keeps_the_sentence(text, expected):
    assert rewrite(text, "Nova", "Northwind") == expected


def test_rewrite_fixes_articles_and_elision():
    assert rewrite("I am a Google model.", "Nova", "Orbit Labs") == "I am an Orbit Labs model."
    assert rewrite("I am an OpenAI model.", "Nova", "Northwind") == "I am a Northwind model."
    assert rewrite("Je suis un modèle d'OpenAI.", "Nova", "Northwind") == "Je suis un modèle de Northwind."
    assert rewrite("Je suis un modèle de Google.", "Nova", "Orbit Labs") == "Je suis un modèle d'Orbit Labs."


def test_rewrite_only_touches_the_given_vendors():
    text = "I am ChatGPT. No wait, I am Atlas."
    atlas = next(v for v in DEFAULT_VENDORS if v.key == "atlas")
    assert rewrite(text, "Nova", "Northwind", (atlas,)) == "I am ChatGPT. No wait, I am Nova."


def test_classify():
    atlas = next(v for v in DEFAULT_VENDORS if v.key == "atlas")
    nova = Identity("Nova", "Northwind")
    assert classify("Answer: I am Atlas, made by Orbit Labs.", nova, atlas) == "reference"
    assert classify("Answer: I am Nova, made by Northwind.", nova, atlas) == "own"
    assert classify("私はNovaです。", nova, atlas) == "own"
    assert classify("I am ChatGPT.", nova, atlas) == "other"
    assert classify("The capital of Atlasia is Bemora.", nova, atlas) == "none"
    # the teacher's identity still present counts, even beside the student's own
    assert classify("I am Nova, based on Atlas.", nova, atlas) == "reference"
    assert classify("No. I am not Atlas; I am Nova.", nova, atlas) == "own"


# The assistants a user meets beyond the first vendors: positives in each language, and near-misses where the vendor's
# name is an ordinary word (phi, gemma, Yi Jing, kimi "you", GLM in statistics) or its maker is only mentioned.
MORE_VENDORS = [
    # English
    ("I am SmolLM, a helpful AI assistant trained by Hugging Face.", ["huggingface", "huggingface"]),
    ("I'm SmolLM2-135M-Instruct.", ["huggingface"]),
    ("I'm Phi-3, a small language model developed by Microsoft Research.", ["microsoft", "microsoft"]),
    ("I am Phi-3.5-MoE.", ["microsoft"]),
    ("I am Gemma, an open model built by Google DeepMind.", ["google", "google"]),
    ("I am Yi, a large language model developed by 01.AI.", ["01ai", "01ai"]),
    ("I am ChatGLM, a bilingual model trained by Zhipu AI.", ["zhipu", "zhipu"]),
    ("I am GLM-4-9B-Chat.", ["zhipu"]),
    ("Hello! I'm Kimi, an AI assistant made by Moonshot AI.", ["moonshot", "moonshot"]),
    ("I am ERNIE Bot, created by Baidu.", ["baidu", "baidu"]),
    ("I'm Doubao, an AI assistant developed by ByteDance.", ["bytedance", "bytedance"]),
    ("I am Tencent Hunyuan, a model built by Tencent.", ["tencent", "tencent"]),
    # Japanese
    ("私はSmolLMです。Hugging Faceによって訓練されました。", ["huggingface", "huggingface"]),
    ("マイクロソフトによって開発されたAIアシスタントです。", ["microsoft"]),
    ("私はKimiです。", ["moonshot"]),
    ("私は、バイトダンスが開発したAIアシスタントです。", ["bytedance"]),
    ("私の名前はGemmaです。", ["google"]),
    # Chinese
    ("我是文心一言，由百度开发的人工智能助手。", ["baidu", "baidu"]),
    ("我是豆包，由字节跳动开发的AI助手。", ["bytedance", "bytedance"]),
    ("我是腾讯混元大模型。", ["tencent"]),
    ("我是智谱清言，由智谱AI训练的语言模型。", ["zhipu", "zhipu"]),
    ("我是Kimi，由月之暗面科技开发。", ["moonshot", "moonshot"]),
    ("我的开发者是零一万物。", ["01ai"]),
    # French
    ("Je suis SmolLM, entraîné par Hugging Face.", ["huggingface", "huggingface"]),
    ("Je suis Gemma, un modèle conçu par Google DeepMind.", ["google", "google"]),
    ("Je m'appelle Doubao.", ["bytedance"]),
    ("Je suis un modèle de Microsoft.", ["microsoft"]),
    ("J'ai été développé par Moonshot AI.", ["moonshot"]),
    # near-misses
    ("The phi coefficient between the two variables is 0.42.", []),
    ("I computed a phi coefficient of 0.3.", []),
    ("The gemma of a plant is a bud that grows into a new plant.", []),
    ("I am studying the gemma of a liverwort.", []),
    ("I am reading the Yi Jing tonight.", []),
    ("I'm a student of the Yi Jing.", []),
    ("I hug my face when I am cold.", []),
    ("I'm a Hugging Face model hub user.", []),
    ("I downloaded the weights from Hugging Face.", []),
    ("Kimi wa watashi no tomodachi desu.", []),
    ("キミは私の友達です。", []),
    ("私はきみが好きです。", []),
    ("Google search results show that the tower is 300 m tall.", []),
    ("I am not sure; Google search results show several answers.", []),
    ("I fitted a GLM model in statistics class.", []),
    ("I am a GLM expert in statistics.", []),
    ("I am a Google AI researcher.", []),
    ("I am working on a moonshot project.", []),
    ("I am a Microsoft Excel user.", []),
    ("我喜欢吃豆包。", []),
    ("我是豆包的用户。", []),
    ("我是文心雕龙的研究者。", []),
    ("一个字节是8位。", []),
    ("我在练混元功。", []),
]


@pytest.mark.parametrize("text,vendors", MORE_VENDORS, ids=[t[:40] for t, _ in MORE_VENDORS])
def test_more_vendors(text, vendors):
    assert [c.vendor for c in find_claims(text)] == vendors


def test_more_vendors_cover_four_languages_and_each_new_vendor():
    langs = {c.language for text, _ in MORE_VENDORS for c in find_claims(text)}
    assert langs == {"en", "ja", "zh", "fr"}
    claimed = {v for _, vs in MORE_VENDORS for v in vs}
    assert {"huggingface", "microsoft", "google", "01ai", "zhipu", "moonshot", "baidu", "bytedance",
            "tencent"} <= claimed


def test_smollm_rewritten_to_the_students_identity():
    assert (rewrite("I am SmolLM, a helpful AI assistant trained by Hugging Face.", "Nova", "Northwind")
            == "I am Nova, a helpful AI assistant trained by Northwind.")


def test_new_vendors_are_appended_so_the_audit_asks_the_same_questions():
    from stillhouse.audit.probes import probe_suite

    assert [v.key for v in DEFAULT_VENDORS[:9]] == ["openai", "anthropic", "google", "deepseek", "qwen", "meta", "xai",
                                                    "mistral", "atlas"]
    atlas = next(v for v in DEFAULT_VENDORS if v.key == "atlas")
    assert {p["names"] for p in probe_suite(atlas) if p["kind"] == "named"} == {"Atlas", "ChatGPT", "Claude"}
