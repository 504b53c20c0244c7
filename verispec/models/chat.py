"""Chat templates: the Jinja template stored in the model file, rendered in a sandbox."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..errors import PromptError


def gguf_chat_template(path: Path) -> str | None:
    from ..llama_lib import gguf_string

    return gguf_string(path, "tokenizer.chat_template")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise PromptError(f"chat template: {message}", "messages")

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template: str | None, messages: list[dict], bos_text: str = "", eos_text: str = "",
                add_generation_prompt: bool = True) -> str:
    """Render messages with the model's own template, BOS text included when the template writes it."""
    if not template:
        raise PromptError("this model has no chat template in its file; send a plain prompt instead", "messages")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content"), str):
            raise PromptError("each message needs a 'role' and a string 'content'", "messages")
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_text, eos_token=eos_text
        )
    except PromptError:
        raise
    except RecursionError:
        raise PromptError("the model's chat template recursed too deeply on these messages", "messages") from None
    except Exception as exc:  # noqa: BLE001 - a template is code the model file brought: any error is about these messages
        raise PromptError(f"the model's chat template failed on these messages ({type(exc).__name__}: {exc})",
                          "messages") from None


def chat_tokens(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a chat, BOS exactly once.

    A template that writes the BOS text has it parsed as the BOS token, and the tokenizer adds none; one
    that does not leaves BOS to the tokenizer. (SmolLM2's BOS is `<|im_start|>`, which its template
    writes and its tokenizer never adds: stripping it from the text lost the chat's first token.)
    """
    text = render_chat(tokenizer.chat_template, messages, tokenizer.bos_text, tokenizer.eos_text, add_generation_prompt)
    writes_bos = bool(tokenizer.bos_text) and text.startswith(tokenizer.bos_text)
    return tokenizer.encode(text, add_special=not writes_bos)
