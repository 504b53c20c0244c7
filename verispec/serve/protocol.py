"""The OpenAI wire format: request bodies in (validated), error bodies and response objects out."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..engine import Stats
from ..sampling import MAX_TOP_LOGPROBS, TokenLogprob

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters: the text held back per step is at most this long
MAX_JSON_DEPTH = 64  # nesting levels of a request body (a deeper one would exhaust the parser's stack)

# OpenAI fields this server does not implement yet, each with the values that ask for nothing (clients send them as
# defaults): any other value is a 400 that names the field, never dropped in silence. Implementing a field: add it to
# the request model and delete its line here.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "response_format": ({"type": "text"},),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "parallel_tool_calls": (True, False),  # no tools are accepted, so it asks for nothing
    "functions": ([],),
    "function_call": ("none", "auto"),
    "repetition_penalty": (1, 1.0),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "prediction": (),
    "modalities": (["text"],),
    "audio": (),
    "reasoning_effort": (),
    "web_search_options": (),
}
UNSUPPORTED_MESSAGE_FIELDS: dict[str, tuple] = {
    "tool_calls": ([],),
    "tool_call_id": (),
    "function_call": (),
    "audio": (),
}
# Fields that change nothing a request writes (bookkeeping on OpenAI's side): accepted and not used.
NO_EFFECT_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})


class ApiError(Exception):
    """An error the client caused (4xx) or a server fault, rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    # Unknown fields are refused (a 400 naming them), not dropped: a client must not get a 200 for what it did not get.
    model_config = ConfigDict(extra="forbid")


class SpeculativeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    draft: StrictStr | None = None  # "none" | "ngram" | "auto" | the server's draft model
    draft_tokens: StrictInt | None = None  # fixed K; None = adaptive
    draft_max: StrictInt | None = None
    tree: StrictStr | None = None  # "none" | "dynamic" | "static:B1,B2,..." (on a server started with --tree)
    tree_budget: StrictInt | None = None  # drafted nodes per tree; None = the server's


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Generation(_Body):
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: StrictFloat = 1.0
    top_p: StrictFloat = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = Field(default=None, ge=0)
    stop: StrictStr | list[StrictStr] | None = Field(default=None)
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    speculative: SpeculativeOptions | None = None
    presence_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat = Field(default=0.0, ge=-2.0, le=2.0)
    min_p: StrictFloat = Field(default=0.0, ge=0.0, le=1.0)  # not OpenAI's: vLLM's and llama-server's
    logit_bias: dict[StrictStr, StrictFloat] | None = None  # token id (as a string) -> added to its logit

    def bias(self, n_vocab: int) -> dict[int, float]:
        """logit_bias with integer token ids, each checked against the vocabulary and [-100, 100]."""
        out = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= n_vocab:
                raise ApiError(400, f"logit_bias keys are token ids in 0..{n_vocab - 1}, got {key!r}", "logit_bias")
            if not -100.0 <= value <= 100.0:
                raise ApiError(400, f"logit_bias values must be in [-100, 100], got {value!r} for {key}", "logit_bias")
            out[int(key)] = float(value)
        return out

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stop):
            raise ApiError(400, f"a stop string may be at most {MAX_STOP_LENGTH} characters long", "stop")
        return stop


class CompletionRequest(_Generation):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]
    # alternatives per token; false (what some clients send for "none") asks for nothing, as null does
    logprobs: Literal[False] | StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_wanted(self) -> int | None:
        return None if self.logprobs is False else self.logprobs

    def default_max_tokens(self, room: int) -> int:
        return min(16, room)  # OpenAI's default for /v1/completions


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None
    # Parts of other types are read, to be refused by name (Message.as_dict): this server reads text only.
    image_url: dict | None = None
    input_audio: dict | None = None
    file: dict | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None  # handed to the chat template, which may use it

    def as_dict(self) -> dict:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                kinds = sorted({p.type for p in self.content if p.type != "text"})
                raise ApiError(400, f"only text content parts are supported, not {', '.join(kinds)}", "messages")
            text = "".join(p.text or "" for p in self.content)
        else:
            text = self.content or ""
        message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def default_max_tokens(self, room: int) -> int:
        return room  # chat has no default limit: the rest of the context


def parse(raw: bytes, kind: type[_Generation]) -> _Generation:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    _check_values(body)
    # Clients send null for "not set" (e.g. "temperature": null): a top-level null takes the default.
    body = _asked_for(body, UNSUPPORTED_FIELDS, "")
    if isinstance(body.get("messages"), list):
        body["messages"] = [_asked_for(m, UNSUPPORTED_MESSAGE_FIELDS, f"messages.{i}.") if isinstance(m, dict) else m
                            for i, m in enumerate(body["messages"])]
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        # An unknown field is what to report first, even where a union's other member failed on something else.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        param = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {param!r}: this server does not implement it", param,
                           "unknown_field") from None
        kind_of = "missing" if first["type"] == "missing" else "invalid"
        raise ApiError(400, f"{kind_of} field {param!r}: {first['msg']}", param, f"{kind_of}_field") from None


def _asked_for(fields: dict, unsupported: dict[str, tuple], where: str) -> dict:
    """The fields that ask for something: nulls, fields without effect and unsupported fields at a value that asks for
    nothing are left out; an unsupported field at any other value is a 400 naming it."""
    out = {}
    for name, value in fields.items():
        if value is None or (not where and name in NO_EFFECT_FIELDS):
            continue
        if name in unsupported:
            if any(type(value) is type(neutral) and value == neutral for neutral in unsupported[name]):
                continue
            raise ApiError(400, f"{where}{name!r} is not supported by this server", where + name, "unsupported_field")
        out[name] = value
    return out


def _check_values(body: dict) -> None:
    """Refuse what the parser accepts but nothing after it can handle: nesting deeper than MAX_JSON_DEPTH, and
    strings (or keys) with a lone UTF-16 surrogate, which cannot be encoded as UTF-8."""
    stack: list[tuple[object, int, str]] = [(body, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", path or None,
                           "invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path)
                stack.append((item, depth + 1, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{path}.{i}") for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid Unicode",
                       path or None, "invalid_unicode") from None


def _is_union_tag(part) -> bool:
    # pydantic puts the union member tried into the location, e.g. ('prompt', 'list[int]', 0)
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


# -- responses -----------------------------------------------------------------------------------

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(stats: Stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated,
            "total_tokens": stats.prompt_tokens + stats.generated}


def speculative(stats: Stats, draft: str, disabled_steps: int, draft_prefill_seconds: float | None = None) -> dict:
    """The response's `speculative` block. `draft_seconds`: time in the drafter's proposals, a draft
    model's catch-up on skipped tokens included; `draft_prefill_seconds`: its prompt prefill (None
    when not known)."""
    return {
        "draft": draft,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "mean_accepted_length": round(stats.mean_accepted_length, 4),
        "target_passes": stats.target_passes,
        "speculation_disabled_steps": disabled_steps,
        "draft_seconds": round(stats.draft_seconds, 4),
        "draft_prefill_seconds": None if draft_prefill_seconds is None else round(draft_prefill_seconds, 4),
        # per 1-based draft position (tree depth): tokens verified there and tokens accepted
        "drafted_at_position": list(stats.drafted_at_position),
        "accepted_at_position": list(stats.accepted_at_position),
    }


class Shape:
    """Builds completion or chat objects (whole or streamed chunks) for one request. `token_bytes` spells a token
    id, for logprobs."""

    def __init__(self, chat: bool, model: str, token_bytes: Callable[[int], bytes] | None = None) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.token_bytes = token_bytes
        self._text_offset = 0  # of the next token's text in the completion, for the completions logprobs object

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish: str, stats: Stats, spec: dict, logprobs: list[TokenLogprob] | None = None) -> dict:
        shaped = self.logprobs(logprobs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": shaped, "finish_reason": finish}
            out = self._object("chat.completion", [choice])
        else:
            out = self._object("text_completion", [{"index": 0, "text": text, "logprobs": shaped, "finish_reason": finish}])
        out["usage"] = usage(stats)
        out["speculative"] = spec
        return out

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False,
              logprobs: list[TokenLogprob] | None = None) -> dict:
        shaped = self.logprobs(logprobs)
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": shaped, "finish_reason": finish}])
        return self._object("text_completion", [{"index": 0, "text": text or "", "logprobs": shaped, "finish_reason": finish}])

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        """The choice's `logprobs` object: chat's {"content": [...]} or the completions' parallel lists (None: not asked)."""
        if entries is None:
            return None
        if self.chat:
            return {"content": [{**self._token(e.token, e.logprob), "top_logprobs": [self._token(t, v) for t, v in e.top]}
                                for e in entries], "refusal": None}
        tokens = [self._token(e.token, e.logprob)["token"] for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [_finite(e.logprob) for e in entries],
                "top_logprobs": [self._top_by_text(e) for e in entries], "text_offset": offsets}

    def _top_by_text(self, entry: TokenLogprob) -> dict[str, float]:
        """Completions key alternatives by their text: of tokens that read the same (e.g. partial characters, U+FFFD),
        the most likely one is kept."""
        top: dict[str, float] = {}
        for token, logprob in entry.top:  # most likely first
            top.setdefault(self._token(token, logprob)["token"], _finite(logprob))
        return top

    def _token(self, token: int, logprob: float) -> dict:
        spelled = self.token_bytes(token)
        return {"token": spelled.decode("utf-8", "replace"), "logprob": _finite(logprob), "bytes": list(spelled)}

    def usage_chunk(self, stats: Stats, spec: dict) -> dict:
        out = self._object("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage(stats)
        out["speculative"] = spec
        return out


def _finite(logprob: float) -> float:
    """JSON has no -inf: OpenAI reports -9999.0 for a token of (about) no probability."""
    return logprob if math.isfinite(logprob) else -9999.0


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
