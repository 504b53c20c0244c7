"""The OpenAI wire format: request bodies in (validated), error bodies and response objects out."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from ..engine import Stats

MAX_STOP_STRINGS = 16


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
    # Unknown fields are ignored, as OpenAI-compatible servers do; known ones are strictly typed.
    model_config = ConfigDict(extra="ignore")


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

    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed", "stop")
        return stop


class CompletionRequest(_Generation):
    prompt: StrictStr | list[StrictStr] | list[StrictInt]

    def default_max_tokens(self, room: int) -> int:
        return min(16, room)  # OpenAI's default for /v1/completions


class ContentPart(_Body):
    type: StrictStr
    text: StrictStr | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None

    def as_dict(self) -> dict:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ApiError(400, "only text content parts are supported", "messages")
            text = "".join(p.text or "" for p in self.content)
        else:
            text = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None

    def default_max_tokens(self, room: int) -> int:
        return room  # chat has no default limit: the rest of the context


def parse(raw: bytes, kind: type[_Generation]) -> _Generation:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    try:
        # Clients send null for "not set" (e.g. "temperature": null): a top-level null takes the default.
        return kind.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or None
        kind_of = "missing" if first["type"] == "missing" else "invalid"
        raise ApiError(400, f"{kind_of} field {param!r}: {first['msg']}", param, f"{kind_of}_field") from None


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
    """Builds completion or chat objects (whole or streamed chunks) for one request."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def whole(self, text: str, finish: str, stats: Stats, spec: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
            out = self._object("chat.completion", [choice])
        else:
            out = self._object("text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])
        out["usage"] = usage(stats)
        out["speculative"] = spec
        return out

    def chunk(self, text: str | None, finish: str | None = None, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            return self._object("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}])
        return self._object("text_completion", [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}])

    def usage_chunk(self, stats: Stats, spec: dict) -> dict:
        out = self._object("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage(stats)
        out["speculative"] = spec
        return out


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
