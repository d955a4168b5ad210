"""The built-in task suite: generated deterministically, in ESFT's jsonl formats.

Six domains, each with its own vocabulary, so that a model pretrained on their mixture routes them to
different experts (experiments/pretrain_tiny.py):

| domain | pretraining text (what the base model sees) | downstream task (a new format) |
|---|---|---|
| home  | device/room/time sentences, half with a JSON event log | `intent`: request -> JSON intent + slots |
| math  | "37 plus 48 equals 85." | `math`: "Compute 37 + 48" -> "85" |
| words | alphabetical word lists | `sort`: sort the given words |
| facts | "Q: What is the capital of X? A: Y.", also in the chat template | (general) the same questions |
| count | "Count the words: a b c -> 3", also in the chat template | (general) the same format |
| docs  | Python standard-library docstrings (functions, classes, methods) | (general) held-out perplexity |

Downstream tasks use formats the pretraining never shows, so the base model does poorly on them
before fine-tuning; the general suite uses the pretraining formats, so fine-tuning can only lose it.
The pieces a task's answer is made of are pretrained, as in the paper's setting (DeepSeek-V2 has seen
JSON): home text logs events as flat JSON, so the `intent` task has to learn a new schema and the
request -> JSON direction, not the embeddings of tokens it never saw (which ESFT and LoRA freeze).
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

DEVICES = ["lamp", "fan", "heater", "speaker", "tv", "oven", "blinds", "kettle", "washer", "camera"]
ROOMS = ["kitchen", "bedroom", "garage", "office", "hallway", "bathroom", "attic", "garden"]
ACTIONS = {
    "turn on": "Device-On",
    "turn off": "Device-Off",
    "check": "Device-Query",
    "schedule": "Device-Timer",
}
WORDS = [
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "mango",
    "olive",
    "peach",
    "plum",
    "melon",
    "kiwi",
    "lime",
    "pear",
    "fig",
    "date",
    "guava",
    "papaya",
    "quince",
    "berry",
    "nectar",
]
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tor",
    "vel",
    "shi",
    "dun",
    "bra",
    "zo",
    "pel",
    "qua",
    "nir",
    "gos",
]
PROPERTIES = ["capital", "river", "mountain", "currency", "poet"]
Record = dict


def _time(rng: np.random.Generator) -> str:
    return f"{int(rng.integers(1, 13))} {'am' if rng.random() < 0.5 else 'pm'}"


def _home(rng: np.random.Generator) -> tuple[str, dict]:
    action = list(ACTIONS)[int(rng.integers(len(ACTIONS)))]
    device, room = DEVICES[int(rng.integers(len(DEVICES)))], ROOMS[int(rng.integers(len(ROOMS)))]
    slots = {"device": device, "room": room}
    request = f"{action} the {device} in the {room}"
    if action == "schedule" or rng.random() < 0.3:
        slots["time"] = _time(rng)
        request += f" at {slots['time']}"
    return request, {"intent": ACTIONS[action], "slots": slots}


def _world(seed: int = 1234) -> dict[str, dict[str, str]]:
    """A fixed made-up world: 40 countries, each with five properties."""
    rng = np.random.default_rng(seed)

    def name(n: int) -> str:
        return "".join(SYLLABLES[int(i)] for i in rng.integers(len(SYLLABLES), size=n)).capitalize()

    return {
        name(2) + "land": {p: name(int(rng.integers(2, 4))) for p in PROPERTIES} for _ in range(40)
    }


WORLD = _world()


def _fact(rng: np.random.Generator) -> tuple[str, str]:
    country = list(WORLD)[int(rng.integers(len(WORLD)))]
    prop = PROPERTIES[int(rng.integers(len(PROPERTIES)))]
    return f"What is the {prop} of {country}?", WORLD[country][prop]


def _words(rng: np.random.Generator) -> list[str]:
    return [WORDS[int(i)] for i in rng.choice(len(WORDS), int(rng.integers(3, 7)), replace=False)]


# --- pretraining text, one document per call -------------------------------------------------------


def _home_text(rng):
    """A sentence about a device, half the time followed by its flat JSON event log."""
    request, parsed = _home(rng)
    slots = parsed["slots"]
    when = f" at {slots['time']}" if "time" in slots else ""
    text = f"The {slots['device']} in the {slots['room']} was asked to {request.split(' the ')[0]}{when}."
    return (
        text + " Event: " + json.dumps({"event": parsed["intent"], **slots})
        if rng.random() < 0.5
        else text
    )


def _math_text(rng):
    a, b = (int(x) for x in rng.integers(0, 100, 2))
    return f"{a} plus {b} equals {a + b}."


def _words_text(rng):
    return "In order: " + ", ".join(sorted(_words(rng))) + "."


def _chat(user: str, assistant: str) -> str:
    return f"User: {user}\n\nAssistant: {assistant}"


def _facts_text(rng):
    """Facts as plain text and, half the time, in the chat template the general suite uses."""
    question, answer = _fact(rng)
    return (
        _chat(f"Q: {question} A:", answer) if rng.random() < 0.5 else f"Q: {question} A: {answer}."
    )


def _count_text(rng):
    words = list(rng.choice(WORDS + SYLLABLES, int(rng.integers(1, 9))))
    prompt = f"Count the words: {' '.join(words)} ->"
    return _chat(prompt, str(len(words))) if rng.random() < 0.5 else f"{prompt} {len(words)}"


HELD_OUT_DOCS = 300  # the last docstrings: never pretrained on, the general perplexity set
DOC_MODULES = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "bz2",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "colorsys",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "contextvars",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "enum",
    "filecmp",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "imaplib",
    "importlib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os.path",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "pprint",
    "pstats",
    "pydoc",
    "queue",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "symtable",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
)


def _public_members(module) -> Iterator[object]:
    """A module's public objects, and the public attributes of the classes it defines."""
    for name, obj in sorted(vars(module).items()):
        if not name.startswith("_"):
            yield obj
            if inspect.isclass(obj) and obj.__module__ == module.__name__:
                yield from (o for n, o in sorted(vars(obj).items()) if not n.startswith("_"))


def python_docs() -> list[str]:
    """Docstrings of the standard library's public functions, classes and methods (text that ships
    with Python; a module this Python lacks is skipped)."""
    docs = []
    with warnings.catch_warnings():  # reading deprecated members (typing.re, ...) warns
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in DOC_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for obj in _public_members(module):
                doc = inspect.getdoc(obj)
                if doc and doc.isascii() and 40 < len(doc) < 2000:
                    docs.append(doc)
    return list(dict.fromkeys(docs))  # unique, stable order


PRETRAIN_TEXT: dict[str, Callable[[np.random.Generator], str]] = {
    "home": _home_text,
    "math": _math_text,
    "words": _words_text,
    "facts": _facts_text,
    "count": _count_text,
}


def pretraining_corpus(n_per_domain: int, seed: int) -> Iterator[Record]:
    """{"text", "domain"} records: n of each generated domain plus the Python docs, interleaved."""
    rng = np.random.default_rng(seed)
    docs = python_docs()[:-HELD_OUT_DOCS]
    for i in range(n_per_domain):
        for domain, make in PRETRAIN_TEXT.items():
            yield {"text": make(rng), "domain": domain}
        yield {"text": docs[i % len(docs)], "domain": "docs"}


# --- downstream tasks (train: messages; eval: prompt + answers) -------------------------------------


def _intent_pair(rng):
    request, parsed = _home(rng)
    return f"Parse into JSON: {request}", json.dumps(parsed)


def _math_pair(rng):
    a, b = (int(x) for x in rng.integers(0, 100, 2))
    return f"Compute {a} + {b}", str(a + b)


def _sort_pair(rng):
    words = _words(rng)
    return f"Sort: {' '.join(words)}", " ".join(sorted(words))


def _facts_pair(rng):
    question, answer = _fact(rng)
    return f"Q: {question} A:", answer


def _count_pair(rng):
    words = list(rng.choice(WORDS + SYLLABLES, int(rng.integers(1, 9))))
    return f"Count the words: {' '.join(words)} ->", str(len(words))


# name -> (pair generator, scorer, max new tokens)
DOWNSTREAM = {
    "intent": (_intent_pair, "intent", 48),
    "math": (_math_pair, "exact_match", 6),
    "sort": (_sort_pair, "exact_match", 24),
}
GENERAL = {"facts": (_facts_pair, "exact_match", 8), "count": (_count_pair, "exact_match", 4)}


def _messages(user: str, assistant: str) -> Record:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


def write_suite(
    out_dir: str | Path,
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    n_docs: int = HELD_OUT_DOCS,
) -> Path:
    """Write train/<task>.jsonl (messages) and eval/<task>.jsonl (prompt/answers) for every
    downstream and general task, plus eval/docs.jsonl (the first n_docs held-out Python docs, as text)."""
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    for t, (name, (make, _, _)) in enumerate({**DOWNSTREAM, **GENERAL}.items()):
        rng = np.random.default_rng([seed, t])
        train = [make(rng) for _ in range(n_train)]
        evals = [make(rng) for _ in range(n_eval)]
        (out / "train" / f"{name}.jsonl").write_text(
            "".join(json.dumps(_messages(u, a)) + "\n" for u, a in train)
        )
        (out / "eval" / f"{name}.jsonl").write_text(
            "".join(
                json.dumps({"prompt": f"User: {u}\n\nAssistant:", "answers": [a]}) + "\n"
                for u, a in evals
            )
        )
    held_out = python_docs()[-HELD_OUT_DOCS:][:n_docs]
    (out / "eval" / "docs.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in held_out)
    )
    return out
