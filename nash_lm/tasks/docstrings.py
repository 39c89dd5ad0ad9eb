"""The docstring summarization corpus, harvested at run time from the installed Python standard library.

Every module, class and function docstring of the standard library's `.py` files (found with `ast`, never
imported) whose first line is a one-sentence summary followed by a blank line and a body becomes an example:

    prompt   = the body (the docstring after its first paragraph; whitespace collapsed; cut at `max_body_chars`
               on a word boundary)
    response = the first line (the summary)
    source   = the full docstring (for the rater's faithfulness criterion)
    id       = "<module>:<qualified name>"

Filters (all configurable): the summary has `min_summary_words`..`max_summary_words` words, is a single line,
and the body has at least `min_body_words` words; doctest-only bodies and duplicates (same summary or same body)
are dropped, keeping the first in sorted file order. The split is deterministic: an example goes to train, valid
or test by the SHA-256 of its id, so it does not depend on the order of harvesting or on which other examples
exist. The corpus depends only on the installed Python (its version is recorded); `load` caches it as JSONL.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import re
import sys
import sysconfig

from nash_lm import distributed

SPLITS = ("train", "valid", "test")
# Directories not harvested: installed packages, tests, tools and data; also every `config-<version>-<platform>`
# directory (the interpreter's build files), whatever the Python version, by its prefix in `_stdlib_files`.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo",
             "ensurepip", "tkinter", "pydoc_data", "venv"}
SKIP_PREFIXES = ("config-",)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    min_summary_words: int = 3
    max_summary_words: int = 12
    min_body_words: int = 8
    max_body_chars: int = 400
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    max_examples: int = 0  # 0: all; otherwise the first examples by id hash (a deterministic subset)

    def validate(self) -> "CorpusConfig":
        if not 1 <= self.min_summary_words <= self.max_summary_words:
            raise ValueError("corpus: need 1 <= min_summary_words <= max_summary_words")
        if self.min_body_words < 1 or self.max_body_chars < 20:
            raise ValueError("corpus: need min_body_words >= 1 and max_body_chars >= 20")
        if not (0 < self.valid_fraction < 1 and 0 < self.test_fraction < 1
                and self.valid_fraction + self.test_fraction < 1):
            raise ValueError("corpus: valid_fraction and test_fraction must be in (0, 1) with a sum below 1")
        if self.max_examples < 0:
            raise ValueError("corpus: max_examples must be >= 0")
        return self


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(SKIP_PREFIXES))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return sorted(out)


def _module_name(root: str, path: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def split_docstring(doc: str):
    """(summary, body) of a cleaned docstring, or None when it has no one-line summary paragraph and body."""
    lines = doc.strip("\n").split("\n")
    if len(lines) < 3 or lines[1].strip():
        return None
    summary = lines[0].strip()
    body = "\n".join(lines[2:]).strip()
    if not summary or not body:
        return None
    return summary, body


def _docstrings(tree: ast.Module, module: str):
    """(qualified name, docstring) of the module and of every class and function, in source order."""
    yield module, ast.get_docstring(tree, clean=True)
    stack = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        children = [c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        for child in reversed(children):
            name = f"{prefix}{child.name}"
            stack.append((child, name + "."))
        for child in children:
            yield f"{module}:{prefix}{child.name}", ast.get_docstring(child, clean=True)


def _words(text: str) -> int:
    return len(text.split())


def harvest(cfg: CorpusConfig = CorpusConfig(), root: str | None = None) -> list[dict]:
    """All examples, sorted by id, each {"id", "prompt", "response", "source", "split"}."""
    cfg.validate()
    root = root or stdlib_dir()
    examples, seen_summary, seen_body = [], set(), set()
    for path in _stdlib_files(root):
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, ValueError, UnicodeDecodeError):
            continue
        module = _module_name(root, path)
        for name, doc in _docstrings(tree, module):
            if not doc:
                continue
            parts = split_docstring(doc)
            if parts is None:
                continue
            summary, body = parts
            body_text = _collapse(body)
            if body_text.startswith(">>>") or not cfg.min_summary_words <= _words(summary) <= cfg.max_summary_words:
                continue
            if _words(body_text) < cfg.min_body_words:
                continue
            key_s, key_b = summary.lower(), body_text.lower()
            if key_s in seen_summary or key_b in seen_body:
                continue
            seen_summary.add(key_s)
            seen_body.add(key_b)
            examples.append({"id": name if ":" in name else f"{name}:", "prompt": _cut(body_text, cfg.max_body_chars),
                             "response": summary, "source": f"{summary}\n\n{body}"})
    for ex in examples:
        ex["split"] = split_of(ex["id"], cfg)
    if cfg.max_examples:
        examples = sorted(examples, key=lambda e: _hash01(e["id"], "subset"))[: cfg.max_examples]
    return sorted(examples, key=lambda e: e["id"])


def _hash01(key: str, salt: str) -> float:
    h = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_of(example_id: str, cfg: CorpusConfig = CorpusConfig()) -> str:
    u = _hash01(example_id, "split")
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.valid_fraction:
        return "valid"
    return "train"


def load(cache_dir: str | None = None, cfg: CorpusConfig = CorpusConfig()) -> list[dict]:
    """The corpus, from `cache_dir/docstrings-<key>.jsonl` when present (key: Python version + config)."""
    cfg.validate()
    key = hashlib.sha256(json.dumps([sys.version, stdlib_dir(), dataclasses.asdict(cfg)]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"docstrings-{key}.jsonl") if cache_dir else None
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    examples = harvest(cfg)
    if path:  # process 0 writes the cache; every process has harvested the same examples
        distributed.write_jsonl(path, examples, sync=False)
    return examples


def split(examples: list[dict], name: str) -> list[dict]:
    if name not in SPLITS:
        raise ValueError(f"split: unknown {name!r}; known: {list(SPLITS)}")
    return [e for e in examples if e["split"] == name]


WORD_RE = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words (the unit of the rater's length and faithfulness criteria)."""
    return WORD_RE.findall(text.lower())
