"""Tokens to text as they stream: what the API, the CLI and the server send a user."""

from __future__ import annotations


class TextAssembler:
    """Turns streamed tokens into text: holds back incomplete UTF-8 and any possible stop-string prefix."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False

    def add(self, tokens: list[int]) -> str:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.stopped = True
                out = text[self.sent : at]
                self.sent = at
                return out
        safe = len(text)
        if text.endswith("\ufffd"):
            safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # keep back a tail that could still grow into a stop string
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        out = text[self.sent : max(self.sent, safe)]
        self.sent = max(self.sent, safe)
        return out

    def flush(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        out = text[self.sent :]
        self.sent = len(text)
        return out
