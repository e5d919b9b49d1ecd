"""One tokenizer interface over three real backends, plus chat templates for preference data.

Backends (``type``):
  - ``"hf"``: a HF ``tokenizers`` ``tokenizer.json``; a sibling ``tokenizer_config.json`` (and/or
    ``chat_template.jinja``) supplies the BOS/EOS/PAD tokens and the tokenizer's own chat template.
  - ``"sentencepiece"``: a sentencepiece ``.model`` file (control pieces such as ``<s>`` are its special tokens).
  - ``"tiktoken"``: a tiktoken BPE ranks file; its split pattern and special tokens come from ``TIKTOKEN_LAYOUTS``,
    keyed by the file's name, because a ranks file does not carry them.

``path`` may be ``pkg://<top-level package>/<file inside it>``: the installed package's folder is located with
``importlib.util.find_spec`` (the package is never imported), e.g. ``pkg://mistral_common/data/tokenizer.model.v1``.

Chat templates (``chat_template``): a name from ``CHAT_TEMPLATES`` ("mistral", "chatml", "gemma", "plain"), an
explicit jinja2 template string, or ``None`` for the tokenizer's own template (HF ``tokenizer_config.json``).
A preference example is tokenised as ``encode_prompt(prompt_messages) + encode_response(answer, prompt=...)``:
the prompt is rendered with the generation prompt (and the BOS token where the template has one). The response is

  - for a named template: the answer's tokens followed by the template's end-of-turn token;
  - for a jinja template: what the template renders for the answer's turn, i.e. the rendered conversation
    ``prompt + [assistant: answer]`` minus the rendered prompt (as TRL takes it), so a turn that ends otherwise
    than with EOS (Gemma's ``<end_of_turn>\n``, ChatML's ``<|im_end|>\n``) ends as the model was trained to end
    it. A HF tokenizer renders with transformers' own ``apply_chat_template``; the others with a sandboxed jinja2
    environment of the same conventions.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

Message = dict[str, str]
# A rendered prompt before encoding: text pieces and special-token ids, in order.
Segment = str | int


class TokenizerError(ValueError):
    """A tokenizer or chat template cannot be built or cannot encode the given messages."""


def resolve_path(path: str) -> Path:
    """Turn ``pkg://package/relative/file`` or a plain path into an existing file path."""
    if not path.startswith("pkg://"):
        resolved = Path(path).expanduser()
        if not resolved.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        return resolved
    package, _, relative = path.removeprefix("pkg://").partition("/")
    if not package or not relative:
        raise TokenizerError(f"expected pkg://<package>/<relative path>, got {path!r}")
    if "." in package:
        # find_spec imports the parents of a dotted name; a folder path inside the top-level package avoids that.
        raise TokenizerError(f"{path!r}: name a top-level package and put sub-folders in the path")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"{path!r}: no installed Python package named {package!r}")
    # Namespace packages (e.g. tiktoken_ext) may span several folders.
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    raise TokenizerError(f"{path!r}: package {package!r} has no file {relative!r} "
                         f"(looked in {list(spec.submodule_search_locations)})")


class SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece

        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self._processor.get_piece_size()
        self.bos_id = _valid_id(self._processor.bos_id())
        self.eos_id = _valid_id(self._processor.eos_id())
        self.pad_id = _valid_id(self._processor.pad_id())
        self.special_tokens = {self._processor.id_to_piece(i): i for i in range(self.vocab_size)
                               if self._processor.is_control(i)}
        self.own_chat_template: str | None = None

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode(list(ids))


class HFTokenizersBackend:
    def __init__(self, path: Path):
        import tokenizers

        self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        # Special tokens inside message text stay text; templates insert them as ids.
        self._tokenizer.encode_special_tokens = True
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {token.content: token_id
                               for token_id, token in self._tokenizer.get_added_tokens_decoder().items()}
        config_path = path.with_name("tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.bos_id = self._token_id(config.get("bos_token"))
        self.eos_id = self._token_id(config.get("eos_token"))
        self.pad_id = self._token_id(config.get("pad_token"))
        self.own_chat_template = _own_chat_template(config, path.with_name("chat_template.jinja"))

        self._path = path
        self._special_strings = {key: _content(config.get(key)) for key in _HF_SPECIAL_KEYS
                                 if _content(config.get(key)) is not None}
        self._renderer = None

    def _token_id(self, token: str | dict | None) -> int | None:
        content = _content(token)
        return None if content is None else self._tokenizer.token_to_id(content)

    def render_chat(self, messages: list[Message], *, template: str, add_generation_prompt: bool) -> str:
        """The conversation as transformers' ``apply_chat_template`` renders it with `template` (text, untokenised)."""
        if self._renderer is None:  # a transformers view of the same tokenizer.json, only to render templates
            from transformers import PreTrainedTokenizerFast

            self._renderer = PreTrainedTokenizerFast(tokenizer_file=str(self._path), **self._special_strings)
        from jinja2 import TemplateError

        try:
            return self._renderer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except (TemplateError, ValueError) as error:  # a syntax error, or the template's raise_exception
            raise TokenizerError(f"chat template failed to render: {error}") from error

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


_HF_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(token: str | dict | None) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _own_chat_template(config: dict, jinja_file: Path) -> str | None:
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


@dataclass(frozen=True)
class TiktokenLayout:
    pattern: str
    special_tokens: dict[str, int]
    eos_token: str


TIKTOKEN_LAYOUTS: dict[str, TiktokenLayout] = {
    "cl100k_base": TiktokenLayout(
        pattern=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                        "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
        eos_token="<|endoftext|>"),
    "qwen": TiktokenLayout(
        pattern=r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""",
        special_tokens={token: 151643 + offset for offset, token in enumerate(
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205))))},
        eos_token="<|endoftext|>"),
}


class TiktokenBackend:
    def __init__(self, path: Path):
        import tiktoken

        layout_name = path.name.split(".")[0]
        if layout_name not in TIKTOKEN_LAYOUTS:
            raise TokenizerError(f"tiktoken ranks file {path.name!r}: unknown layout {layout_name!r}; "
                                 f"known: {sorted(TIKTOKEN_LAYOUTS)}")
        layout = TIKTOKEN_LAYOUTS[layout_name]
        # Parsed here rather than with tiktoken.load, which copies local files into a cache folder.
        ranks = {base64.b64decode(token): int(rank)
                 for token, rank in (line.split() for line in path.read_bytes().splitlines() if line)}
        self._encoding = tiktoken.Encoding(layout_name, pat_str=layout.pattern, mergeable_ranks=ranks,
                                           special_tokens=layout.special_tokens)
        self.vocab_size = self._encoding.n_vocab
        self.special_tokens = dict(layout.special_tokens)
        self.bos_id = None
        self.eos_id = layout.special_tokens[layout.eos_token]
        self.pad_id = None
        self.own_chat_template = None

    def encode(self, text: str) -> list[int]:
        # disallowed_special=() encodes special-token strings found in message text as ordinary text.
        return self._encoding.encode(text, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))


Backend = SentencePieceBackend | HFTokenizersBackend | TiktokenBackend
BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "hf": HFTokenizersBackend, "sentencepiece": SentencePieceBackend, "tiktoken": TiktokenBackend}


def _valid_id(token_id: int) -> int | None:
    return token_id if token_id >= 0 else None


def _require_special(backend: Backend, token: str, template: str) -> int:
    if token not in backend.special_tokens:
        raise TokenizerError(f"chat template {template!r} needs the special token {token!r}, "
                             "which this tokenizer does not have")
    return backend.special_tokens[token]


def _require(token_id: int | None, what: str, template: str) -> int:
    if token_id is None:
        raise TokenizerError(f"chat template {template!r} needs the {what} token, which this tokenizer does not have")
    return token_id


def _render_mistral(messages: list[Message], backend: Backend) -> list[Segment]:
    """``<s>[INST] user [/INST] answer</s>[INST] user [/INST]`` (Mistral v1); a system message is prepended to the
    first user turn, as mistral-common does. Each text piece is encoded separately, as mistral-common does."""
    bos = _require(backend.bos_id, "BOS", "mistral")
    eos = _require(backend.eos_id, "EOS", "mistral")
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = messages[1:] if system is not None else messages
    segments: list[Segment] = [bos]
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = index + len(messages) - len(turns)
            raise TokenizerError(f"mistral template: message {position} has role {message['role']!r}, expected "
                                 f"{expected!r} (optional system first, then user/assistant alternating)")
        if expected == "assistant":
            segments += [message["content"], eos]
            continue
        content = message["content"] if index or system is None else f"{system}\n\n{message['content']}"
        segments.append(f"[INST] {content} [/INST]")
    if not turns or turns[-1]["role"] != "user":
        raise TokenizerError("mistral template: a prompt must end with a user message")
    return segments


def _render_chatml(messages: list[Message], backend: Backend) -> list[Segment]:
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``."""
    start = _require_special(backend, "<|im_start|>", "chatml")
    end = _require_special(backend, "<|im_end|>", "chatml")
    segments: list[Segment] = []
    for message in messages:
        segments += [start, f"{message['role']}\n{message['content']}", end, "\n"]
    return segments + [start, "assistant\n"]


def _render_gemma(messages: list[Message], backend: Backend) -> list[Segment]:
    """``<bos><start_of_turn>user\ncontent<end_of_turn>\n`` per turn (the assistant's role is ``model``), then
    ``<start_of_turn>model\n``; a system message opens the first user turn, followed by a blank line, and every
    content is stripped (Gemma 3's own chat template)."""
    bos = _require(backend.bos_id, "BOS", "gemma")
    start = _require_special(backend, "<start_of_turn>", "gemma")
    end = _require_special(backend, "<end_of_turn>", "gemma")
    system = messages[0]["content"].strip() + "\n\n" if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if system else messages
    segments: list[Segment] = [bos]
    for index, message in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise TokenizerError(f"gemma template: message {index + len(messages) - len(turns)} has role "
                                 f"{message['role']!r}, expected {expected!r} (optional system first, then "
                                 "user/assistant alternating)")
        role = "user" if expected == "user" else "model"
        prefix = system if index == 0 else ""
        segments += [start, f"{role}\n{prefix}{message['content'].strip()}", end, "\n"]
    if not turns or turns[-1]["role"] != "user":
        raise TokenizerError("gemma template: a prompt must end with a user message")
    return segments + [start, "model\n"]


def _render_plain(messages: list[Message], backend: Backend) -> list[Segment]:
    """Base models: BOS (when the tokenizer has one), then each message's text on its own line, no role markers."""
    text = "".join(f"{message['content']}\n" for message in messages)
    return [backend.bos_id, text] if backend.bos_id is not None else [text]


def _chatml_end_of_turn(backend: Backend) -> int:
    return _require_special(backend, "<|im_end|>", "chatml")


def _gemma_end_of_turn(backend: Backend) -> int:
    return _require_special(backend, "<end_of_turn>", "gemma")


def _eos_end_of_turn(backend: Backend) -> int:
    if backend.eos_id is None:
        raise TokenizerError("responses end with the EOS token, which this tokenizer does not define (for a HF "
                             "tokenizer.json: set eos_token in the tokenizer_config.json beside it)")
    return backend.eos_id


@dataclass(frozen=True)
class NamedTemplate:
    """``render``: prompt messages with the generation prompt. A named template ends a response with the token of
    ``end_of_turn`` and ``after_turn`` (Gemma's newline); a jinja template renders the response's turn itself
    (``render_response``: prompt messages and the answer -> the response's segments)."""
    render: Callable[[list[Message], Backend], list[Segment]]
    end_of_turn: Callable[[Backend], int] | None = None
    after_turn: str = ""  # text a turn ends with after its end-of-turn token
    render_response: Callable[[list[Message], str], list[Segment]] | None = None


CHAT_TEMPLATES: dict[str, NamedTemplate] = {
    "mistral": NamedTemplate(render=_render_mistral, end_of_turn=_eos_end_of_turn),
    "chatml": NamedTemplate(render=_render_chatml, end_of_turn=_chatml_end_of_turn),
    "gemma": NamedTemplate(render=_render_gemma, end_of_turn=_gemma_end_of_turn, after_turn="\n"),
    "plain": NamedTemplate(render=_render_plain, end_of_turn=_eos_end_of_turn),
}
# Changes whenever a response of the same template tokenises differently, so that a score cache made before notices
RESPONSE_CONVENTION = "response: named: answer + end of turn (+ gemma's newline); jinja: the rendered turn"


def _sandbox_renderer(source: str, backend: Backend) -> Callable[..., str]:
    """A jinja2 chat template rendered as transformers renders one (``messages``, ``add_generation_prompt``,
    ``bos_token``, ``eos_token``, ``raise_exception``), for tokenizers transformers does not load."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template: {message}")

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    try:
        template = environment.from_string(source)
    except TemplateError as error:
        raise TokenizerError(f"chat template is not valid jinja2: {error}") from error
    id_to_token = {token_id: token for token, token_id in backend.special_tokens.items()}

    def render(messages: list[Message], *, add_generation_prompt: bool) -> str:
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=id_to_token.get(backend.bos_id, ""),
                                   eos_token=id_to_token.get(backend.eos_id, ""))
        except TemplateError as error:
            raise TokenizerError(f"chat template failed to render: {error}") from error

    return render


def _jinja_template(source: str, backend: Backend) -> NamedTemplate:
    """A jinja2 chat template: rendered by transformers for a HF tokenizer, by ``_sandbox_renderer`` otherwise.
    The rendered text is split on the tokenizer's special-token strings, which become ids; the response is the
    rendered conversation with the answer minus the rendered prompt (module docstring)."""
    if isinstance(backend, HFTokenizersBackend):
        def render_text(messages: list[Message], *, add_generation_prompt: bool) -> str:
            return backend.render_chat(messages, template=source, add_generation_prompt=add_generation_prompt)
    else:
        render_text = _sandbox_renderer(source, backend)
    specials = sorted(backend.special_tokens, key=len, reverse=True)
    splitter = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def segments(text: str) -> list[Segment]:
        pieces = splitter.split(text) if splitter else [text]
        return [backend.special_tokens.get(piece, piece) for piece in pieces if piece]

    def render(messages: list[Message], _: Backend) -> list[Segment]:
        return segments(render_text(messages, add_generation_prompt=True))

    def render_response(messages: list[Message], answer: str) -> list[Segment]:
        prompt = render_text(messages, add_generation_prompt=True)
        full = render_text([*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise TokenizerError(f"chat template: the conversation rendered with the answer does not begin with the "
                                 f"prompt rendered for generation (which ends {prompt[-40:]!r}), so the response's "
                                 "tokens cannot be told apart")
        return segments(full[len(prompt):])

    return NamedTemplate(render=render, render_response=render_response)


class ChatTokenizer:
    """A backend plus a chat template: ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``encode``, ``decode``, and
    ``encode_prompt``/``encode_response``."""

    def __init__(self, *, backend: Backend, template: NamedTemplate, template_name: str, template_source: str):
        self._backend = backend
        self._template = template
        self.template_name = template_name
        # The name of a built-in template or the jinja text rendered (the tokenizer's own for "own"), after the
        # response convention: what a cache of scores must record to notice that rows would now tokenise
        # differently.
        self.template_source = template_source
        self.vocab_size = backend.vocab_size
        self.bos_id = backend.bos_id
        self.eos_id = backend.eos_id
        # Padding positions are masked out, so any valid id serves when the tokenizer has no pad token.
        self.pad_id = next(i for i in (backend.pad_id, backend.eos_id, 0) if i is not None)
        # Fail at build time, not at the first data row, when the template cannot work with this tokenizer.
        probe = [{"role": "user", "content": "Hello"}]
        self.encode_prompt(probe)
        # The token a response's turn ends with: the named template's, or the first special token a jinja template
        # renders after an answer's text (None if it renders none)
        if template.end_of_turn is not None:
            self.end_of_turn_id = template.end_of_turn(backend)
        else:
            segments = template.render_response(probe, "Hi")
            text_at = max((index for index, segment in enumerate(segments) if isinstance(segment, str)
                           and "Hi" in segment), default=len(segments))
            self.end_of_turn_id = next((segment for segment in segments[text_at:] if isinstance(segment, int)), None)

    def encode(self, text: str) -> list[int]:
        """Plain text to ids: no BOS/EOS added; special-token strings in the text are encoded as text."""
        return self._backend.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(ids)

    def encode_prompt(self, messages: list[Message]) -> list[int]:
        """Prompt messages rendered with the generation prompt (BOS included where the template has one)."""
        _check_messages(messages)
        ids: list[int] = []
        for segment in self._template.render(messages, self._backend):
            ids += [segment] if isinstance(segment, int) else self._backend.encode(segment)
        return ids

    def encode_response(self, text: str, *, prompt: list[Message] | None = None) -> list[int]:
        """The assistant's answer as the template ends its turn (module docstring): after `prompt` (the messages
        ``encode_prompt`` took; a jinja template needs them) the tokens that complete the conversation."""
        if self._template.render_response is None:
            return self._backend.encode(text) + [self.end_of_turn_id] + self._backend.encode(self._template.after_turn)
        if prompt is None:
            raise TokenizerError(f"chat template {self.template_name!r} renders a response after its prompt: "
                                 "pass prompt= (the prompt messages)")
        _check_messages(prompt)
        ids: list[int] = []
        for segment in self._template.render_response(prompt, text):
            ids += [segment] if isinstance(segment, int) else self._backend.encode(segment)
        return ids


def _check_messages(messages: list[Message]) -> None:
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for index, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise TokenizerError(f"message {index} must be a dict with string 'role' and 'content'")


def build_tokenizer(*, type: str, path: str, chat_template: str | None) -> ChatTokenizer:
    """Load a tokenizer (``type`` in ``BACKENDS``) from ``path`` and attach a chat template.

    ``chat_template``: a name in ``CHAT_TEMPLATES``, a jinja2 template string (recognised by ``{{`` or ``{%``),
    or ``None`` for the tokenizer's own template.
    """
    if type not in BACKENDS:
        raise TokenizerError(f"unknown tokenizer type {type!r}; known: {sorted(BACKENDS)}")
    backend = BACKENDS[type](resolve_path(path))
    if chat_template is None:
        if backend.own_chat_template is None:
            raise TokenizerError(f"tokenizer {path!r} has no chat template of its own; choose one of "
                                 f"{sorted(CHAT_TEMPLATES)} or pass a jinja2 template string")
        return ChatTokenizer(backend=backend, template=_jinja_template(backend.own_chat_template, backend),
                             template_name="own",
                             template_source=f"{RESPONSE_CONVENTION}\n{backend.own_chat_template}")
    if "{{" in chat_template or "{%" in chat_template:
        return ChatTokenizer(backend=backend, template=_jinja_template(chat_template, backend),
                             template_name="jinja", template_source=f"{RESPONSE_CONVENTION}\n{chat_template}")
    if chat_template not in CHAT_TEMPLATES:
        raise TokenizerError(f"unknown chat template {chat_template!r}; known: {sorted(CHAT_TEMPLATES)}, "
                             "a jinja2 template string, or None for the tokenizer's own")
    return ChatTokenizer(backend=backend, template=CHAT_TEMPLATES[chat_template], template_name=chat_template,
                         template_source=chat_template)
