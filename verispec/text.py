"""Tokens to text as they stream: what the API, the CLI and the server send a user."""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """New text per token batch, decoding a window of the last few tokens instead of the whole output.

    The window starts one token batch back (`prefix`): its decoded text is subtracted from the text of
    the window with the new tokens, so a tokenizer that drops a leading space on the first token of a
    decode (SentencePiece) or merges bytes across tokens still yields exactly the text it would write
    whole. While the window's text ends in an incomplete UTF-8 sequence (U+FFFD), nothing is emitted
    and the window waits for the next tokens. (The approach of vLLM's and TGI's detokenizers;
    tokenizers' DecodeStream takes only a Hugging Face fast tokenizer, not llama.cpp's.)
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0  # the window's first token
        self.read = 0  # tokens whose text was emitted

    def add(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        before = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix :])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            return ""
        self.prefix, self.read = self.read, len(self.tokens)
        return text[len(before) :]

    def flush(self) -> str:
        """What is left, an incomplete UTF-8 tail written as U+FFFD."""
        before = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix :])
        self.prefix = self.read = len(self.tokens)
        return text[len(before) :]


class TextAssembler:
    """Turns streamed tokens into text: holds back incomplete UTF-8 and any possible stop-string prefix.

    Each call costs what its new tokens and the held-back text cost, not what the whole output does."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.held = ""  # decoded, not yet returned: it could still grow into a stop string
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        self.held += self.decoder.add(tokens)
        found = [at for at in (self.held.find(s) for s in self.stop) if at >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[: min(found)], ""
            return out
        keep = max((_stop_prefix(self.held, s) for s in self.stop), default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out

    def flush(self) -> str:
        out, self.held = self.held + self.decoder.flush(), ""
        return out


def _stop_prefix(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (and is shorter than it)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
