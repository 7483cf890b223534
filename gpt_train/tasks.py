"""Benchmark tasks: their files found and read, each item turned into token requests.

A task is a JSON-lines file named after it (`piqa.jsonl`) anywhere under --tasks_dir, so
llm-foundry's `scripts/eval/local_data/` and nanochat's eval bundle are read as they are. Each
line's keys say its format, and each format becomes the candidates of one item, every candidate
a (context, continuation) pair of text:
- multiple choice `{"query", "choices", "gold"}`: the query, then " " + each choice;
- schema `{"context_options", "continuation", "gold"}`: each option, then " " + the continuation;
- language modelling `{"context", "continuation"}`: one candidate, " " + the continuation, right
  when greedy decoding gives every one of its tokens;
- HellaSwag's own release (`hellaswag_val.jsonl`: activity_label, ctx_a, ctx_b, endings, label),
  prompted as lm-evaluation-harness prompts its `hellaswag` task (`hellaswag_prompt`).
The pairs become token ids exactly as lm-evaluation-harness's Hugging Face model makes them
(`encode_pair`): the context's trailing whitespace moves to the continuation, the pair is encoded
whole and the context's ids split off, an empty context is the id sample.py starts from, and a
context longer than the model's block is cut from the left (`request_tokens`). How the requests
are batched and scored is task_scoring.py's job.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from config import UserError, fail

# Each format: the keys that identify it (all must be present) and the kind of item it makes.
FORMATS = {
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "schema": ("context_options", "continuation", "gold"),
    "multiple_choice": ("query", "choices", "gold"),
    "language_modelling": ("context", "continuation"),
}
# The file names a task is found by, besides `<task>.jsonl`.
OTHER_FILE_NAMES = {"hellaswag": ("hellaswag_val.jsonl",)}


@dataclass
class Item:
    """One question: a candidate per (context, continuation) pair, the right one's index, and for
    multiple choice the length in characters of each choice (acc_norm's divisor)."""

    contexts: list
    continuations: list
    gold: int
    kind: str
    choice_lengths: list | None = None
    line: int = 0  # in its file, for messages


@dataclass
class Task:
    name: str
    path: Path
    kind: str  # "multiple_choice", "schema" or "language_modelling" (HellaSwag: multiple choice)
    items: list  # of Item

    @property
    def has_acc_norm(self):
        return self.kind == "multiple_choice"


def parse_task_names(text):
    """"hellaswag, piqa" -> ["hellaswag", "piqa"], each once, in order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    return list(dict.fromkeys(names))


def find_task_file(name, tasks_dir):
    """The one file of task `name` under `tasks_dir`, or one line naming what is there."""
    root = Path(tasks_dir)
    if not root.is_dir():
        fail(f"--tasks_dir {tasks_dir} is not a directory")
    for file_name in (f"{name}.jsonl", *OTHER_FILE_NAMES.get(name, ())):
        found = sorted(path for path in root.rglob(file_name) if path.is_file())
        if len(found) > 1:
            fail(f"task {name}: {len(found)} files named {file_name} under {tasks_dir} "
                 f"({', '.join(str(path) for path in found[:3])}); point --tasks_dir at one")
        if found:
            return found[0]
    available = sorted({path.stem for path in root.rglob("*.jsonl")})
    shown = ", ".join(available[:12]) + (f" and {len(available) - 12} more"
                                         if len(available) > 12 else "")
    fail(f"unknown task {name}: no {name}.jsonl under {tasks_dir} "
         f"({f'found: {shown}' if available else 'it holds no .jsonl files'})")


def read_task(name, tasks_dir, limit=0):
    """The task's first `limit` items (0 = all), read from its file."""
    path = find_task_file(name, tasks_dir)
    items, kind = [], None
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if limit and len(items) == limit:
                    break
                if not line.strip():
                    continue
                item = parse_line(line, f"{path}:{number}")
                item.line = number
                if kind is not None and item.kind != kind:
                    fail(f"{path}:{number}: a {item.kind.replace('_', ' ')} item in a file of "
                         f"{kind.replace('_', ' ')} items")
                kind = item.kind
                items.append(item)
    except UnicodeDecodeError as error:
        fail(f"{path} is not UTF-8 text: {error.reason} at byte {error.start}")
    except OSError as error:
        fail(f"cannot read {path}: {error.strerror or error}")
    if not items:
        fail(f"{path} holds no items")
    return Task(name, path, kind, items)


def parse_line(line, where):
    """One line of a task file as an Item; a line that is not one of the formats is one error
    naming its file and line."""
    try:
        record = json.loads(line)
    except ValueError as error:
        fail(f"{where}: not a JSON object ({error})")
    if not isinstance(record, dict):
        fail(f"{where}: not a JSON object")
    shape = next((shape for shape, keys in FORMATS.items() if all(k in record for k in keys)),
                 None)
    if shape is None:
        fail(f"{where}: keys {sorted(record)} match no task format (multiple choice: query, "
             f"choices, gold; schema: context_options, continuation, gold; language "
             f"modelling: context, continuation; HellaSwag: ctx_a, ctx_b, endings, label)")
    try:
        return ITEM_MAKERS[shape](record)
    except (TypeError, ValueError, IndexError, AttributeError) as error:
        fail(f"{where}: a malformed {shape.replace('_', ' ')} item ({error})")


def texts(value, what):
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a non-empty list of strings")
    return value


def text(value, what):
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    return value


def gold_index(value, count):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("gold must be an integer")
    gold = int(value)
    if not 0 <= gold < count:
        raise ValueError(f"gold {gold} is not the index of one of the {count} candidates")
    return gold


def multiple_choice_item(record):
    query = text(record["query"], "query")
    choices = texts(record["choices"], "choices")
    return Item([query] * len(choices), [" " + choice for choice in choices],
                gold_index(record["gold"], len(choices)), "multiple_choice",
                [len(choice) for choice in choices])


def schema_item(record):
    options = texts(record["context_options"], "context_options")
    continuation = " " + text(record["continuation"], "continuation")
    return Item(list(options), [continuation] * len(options),
                gold_index(record["gold"], len(options)), "schema")


def language_modelling_item(record):
    return Item([text(record["context"], "context")],
                [" " + text(record["continuation"], "continuation")], 0, "language_modelling")


def hellaswag_item(record):
    query, endings = hellaswag_prompt(record)
    return multiple_choice_item({"query": query, "choices": endings, "gold": record["label"]})


def hellaswag_prompt(record):
    """(query, endings) of a HellaSwag release record, as lm-evaluation-harness writes them: the
    activity label, a colon, the first context sentence and the second with only its first
    letter upper case (the rest lower: Python's `str.capitalize`), each text cleaned of the
    WikiHow markup (`clean_hellaswag_text`)."""
    context = text(record["ctx_a"], "ctx_a") + " " + text(record["ctx_b"], "ctx_b").capitalize()
    query = clean_hellaswag_text(text(record["activity_label"], "activity_label") + ": " + context)
    return query, [clean_hellaswag_text(ending) for ending in texts(record["endings"], "endings")]


def clean_hellaswag_text(value):
    """Strip the ends; " [title]" becomes ". "; any other bracketed tag is dropped; then each
    double space becomes one (once over the text, as str.replace does)."""
    value = value.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", value).replace("  ", " ")


ITEM_MAKERS = {"hellaswag": hellaswag_item, "schema": schema_item,
               "multiple_choice": multiple_choice_item,
               "language_modelling": language_modelling_item}


# --------------------------------------------------------------------- text to token requests

def encode_pair(encode, context, continuation, start_id):
    """(context ids, continuation ids) of one candidate, split as lm-evaluation-harness splits
    them: whitespace that ends the context belongs to the continuation, the whole text is
    encoded and the context's own ids are cut off the front (so a token spanning the boundary
    counts as the continuation's). An empty context is `start_id`, the id sample.py starts
    from, unless the continuation itself starts with that id."""
    if not context:
        continuation_ids = encode(continuation)
        if continuation_ids and continuation_ids[0] == start_id:
            return continuation_ids[:1], continuation_ids[1:]
        return [start_id], continuation_ids
    stripped = context.rstrip()
    if len(stripped) < len(context):
        context, continuation = stripped, context[len(stripped):] + continuation
    context_ids = encode(context) if context else [start_id]
    whole = encode(context + continuation) if context else \
        context_ids + encode(continuation)
    return context_ids, whole[len(context_ids):]


def request_tokens(context_ids, continuation_ids, block_size):
    """(input ids, number of context ids among them): the context then the continuation minus
    its last id, the oldest ids cut so that at most block_size remain (lm-evaluation-harness's
    left truncation). The last len(continuation) inputs predict the continuation."""
    whole = (context_ids + continuation_ids)[-(block_size + 1):]
    return whole[:-1], len(whole) - len(continuation_ids)


@dataclass
class EncodedItem:
    """An item as token requests: per candidate its input ids and how many are context."""

    inputs: list  # per candidate, a list of ids
    context_lengths: list  # per candidate
    continuations: list  # per candidate, the ids scored


def encode_task(task, tokenizer, block_size, start_id):
    """(encoded items, indices of the items kept): an item holding a character a char-level
    vocabulary lacks is left out; a candidate longer than the block on its own is an error."""
    encoded, kept, cache = [], [], {}

    def encode(value):
        if value not in cache:
            cache[value] = [int(i) for i in tokenizer.encode(value)] if value else []
        return cache[value]

    for index, item in enumerate(task.items):
        try:
            pairs = [encode_pair(encode, context, continuation, start_id)
                     for context, continuation in zip(item.contexts, item.continuations)]
        except UserError:  # only a char-level vocabulary refuses text
            continue
        encoded.append(encoded_item(pairs, block_size, f"{task.path}:{item.line}"))
        kept.append(index)
    return encoded, kept


def encoded_item(pairs, block_size, where):
    inputs, context_lengths, continuations = [], [], []
    for context_ids, continuation_ids in pairs:
        if not continuation_ids:
            fail(f"{where}: a candidate with nothing to score")
        if len(continuation_ids) > block_size:
            fail(f"{where}: a candidate of {len(continuation_ids)} tokens, longer on its own "
                 f"than the model's block_size {block_size}")
        ids, context_length = request_tokens(context_ids, continuation_ids, block_size)
        inputs.append(ids)
        context_lengths.append(context_length)
        continuations.append(continuation_ids)
    return EncodedItem(inputs, context_lengths, continuations)
