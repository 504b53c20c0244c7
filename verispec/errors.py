"""User-facing errors. Each carries a message meant to be printed as is, without a traceback."""


class VerispecError(Exception):
    """Base class: the CLI prints these as one line, the server turns them into 4xx bodies."""

    param: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidParameter(VerispecError, ValueError):
    """A sampling or speculative parameter outside its allowed range."""


class PromptError(VerispecError, ValueError):
    """An empty prompt or one that does not fit the context."""


class ModelNotFound(VerispecError, LookupError):
    """An unknown model name or a path that does not exist."""


class ModelFileError(VerispecError):
    """A model file that is truncated, corrupted or not a GGUF / Hugging Face model."""


class TokenizerMismatch(VerispecError):
    """A draft whose vocabulary differs from the target's."""
