"""Stage: prompts. Records (a prompt plus any other columns), chat formatting, the sampler
that hands out `gen_batch_size` records per generation round, epoch after epoch, and the
loaders that turn JSONL/Parquet/CSV files or `datasets` datasets into records."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dapo.errors import DataError, PromptTooLongError
from dapo.progress import stderr_warning

Record = dict[str, Any]


def to_messages(prompt: Any, system_prompt: str | None = None,
                warn: Callable[[str], None] = stderr_warning) -> list[dict[str, str]]:
    """A prompt string becomes one user message; chat messages pass through. A prompt whose own
    system message differs from `system_prompt` keeps it, and `warn` is told (pass a callable that
    speaks once, e.g. Reporter.once, when templating many prompts)."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        messages = [dict(role=m["role"], content=m["content"]) for m in prompt]
    else:
        raise DataError(f"a prompt must be a string or a list of {{role, content}} messages, got {prompt!r:.80}")
    if system_prompt is not None:
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}] + messages
        elif messages[0]["content"] != system_prompt:
            warn(f"dapo: warning: --system-prompt is not used for prompts whose messages already start with a "
                 f"system message; they keep their own (first: {messages[0]['content'][:60]!r})")
    return messages


def encode_prompt(tokenizer: Any, prompt: Any, system_prompt: str | None, max_prompt_len: int,
                  warn: Callable[[str], None] = stderr_warning) -> list[int]:
    """Token ids of the chat-templated prompt, ending with the assistant turn's opening."""
    out = tokenizer.apply_chat_template(to_messages(prompt, system_prompt, warn), add_generation_prompt=True,
                                        tokenize=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    if len(ids) > max_prompt_len:
        raise PromptTooLongError(f"prompt is {len(ids)} tokens with the chat template, longer than "
                                 f"max_prompt_len={max_prompt_len}: {str(prompt)[:80]!r}")
    return ids


@dataclass
class PromptSampler:
    """Draws records without replacement in a seeded shuffled order, reshuffling every epoch.

    Its whole state is (epoch, position, seed), so a resumed run draws the same prompts.
    """

    records: list[Record]
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not self.records:
            raise DataError("the training dataset is empty")
        self._order = self._shuffled(self.epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_indices(self, n: int) -> list[int]:
        """The indices (into `records`) of the next n prompts."""
        out = []
        for _ in range(n):
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            out.append(self._order[self.position])
            self.position += 1
        return out

    def next(self, n: int) -> list[Record]:
        return [self.records[i] for i in self.next_indices(n)]

    @property
    def prompts_consumed(self) -> int:
        return self.epoch * len(self.records) + self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)


# --- loading datasets -----------------------------------------------------------------------

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_records(source: str, split: str = "train", *, prompt_column: str = "prompt",
                 prompt_template: str | None = None) -> list[Record]:
    """Read a dataset through the `datasets` library and normalise it with `normalize_records`.

    `source` is a .jsonl/.json/.parquet/.csv file (its one split; `split` is ignored), a directory
    of such files, a directory written by `save_to_disk` (a Dataset: its one split; a
    DatasetDict: `split`), or a Hugging Face datasets id (`split` again).
    """
    rows = _read_rows(source, split)
    return normalize_records(rows, prompt_column=prompt_column, prompt_template=prompt_template, source=source)


def _read_rows(source: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("reading datasets needs the `datasets` package: pip install datasets") from e
    # Progress bars from the datasets cache would interleave with the training log.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{source!r}: unsupported file type {path.suffix!r}; use "
                                f"{', '.join(sorted(_FILE_BUILDERS))}, a directory, or a datasets id")
            if builder in ("json", "csv"):
                check_utf8(path)
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            if not path.exists() and (source.startswith((".", "/", "~")) or Path(source).suffix in _FILE_BUILDERS):
                raise DataError(f"data file {source!r} does not exist")
            if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
                # Written by Dataset.save_to_disk / DatasetDict.save_to_disk: load_dataset refuses those.
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.Dataset):
                    return loaded.to_list()  # one split, like a single file: `split` is ignored
            else:
                loaded = datasets.load_dataset(str(path) if path.exists() else source)
            if split not in loaded:
                raise DataError(f"{source!r} has no split {split!r} (splits: {', '.join(loaded)}); "
                                f"choose one with --data-split / --eval-split")
            ds = loaded[split]
    except DataError:
        raise
    except Exception as e:  # parse errors, missing hub ids, no network: one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"could not read dataset {source!r} ({type(e).__name__}: {first})") from e
    try:
        return ds.to_list()
    except Exception as e:  # e.g. bytes that are not UTF-8 inside a directory's files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"could not read dataset {source!r} ({type(e).__name__}: {first})") from e


def check_utf8(path: Path) -> None:
    """Raise DataError naming the line of the first byte sequence in a text data file that is not UTF-8."""
    with Path(path).open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"data file {str(path)!r}, line {number}: byte 0x{line[e.start]:02x} is not UTF-8 "
                                "text; re-encode the file as UTF-8") from None


def check_template(template: str) -> list[str]:
    """The column names a prompt template uses; only plain '{column}' fields (with an optional
    format spec) are allowed: '{prompt.x}' or '{row[0]}' would reach into Python objects."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DataError(f"prompt_template {template!r} is not a valid format string: {e}") from None
    names = []
    for _, field_name, _, _ in parsed:
        if field_name is None:
            continue
        if not field_name.isidentifier():
            raise DataError(f"prompt_template {template!r}: field {{{field_name}}} must name a column, as in "
                            "'{question}' (no attribute access, indexing or positional fields)")
        names.append(field_name)
    return names


def normalize_records(rows: Sequence[dict[str, Any]], *, prompt_column: str = "prompt",
                      prompt_template: str | None = None, source: str = "dataset") -> list[Record]:
    """Give every row a "prompt" key (the trainer's only requirement) and check it.

    With `prompt_template` the prompt is `prompt_template.format(**row)` (a user message);
    otherwise it is `row[prompt_column]`, a string or chat messages. All columns are kept so
    reward functions receive them.
    """
    if not rows:
        raise DataError(f"{source!r}: the dataset is empty")
    columns = list(rows[0])
    if prompt_template is not None:
        check_template(prompt_template)
    out = []
    for i, row in enumerate(rows):
        record = dict(row)
        if prompt_template is not None:
            try:
                record["prompt"] = prompt_template.format(**row)
            except KeyError as e:
                raise DataError(f"{source!r}: prompt_template {prompt_template!r} names column {e.args[0]!r}, "
                                f"which the data lacks (columns: {', '.join(columns)})") from None
            except (IndexError, ValueError) as e:
                raise DataError(f"prompt_template {prompt_template!r} is not a valid format string: {e}") from None
        else:
            if prompt_column not in row:
                raise DataError(f"{source!r} has no column {prompt_column!r} (columns: {', '.join(columns)}); "
                                f"name the prompt column with --prompt-column or build prompts with "
                                f"--prompt-template")
            record["prompt"] = row[prompt_column]
        try:
            to_messages(record["prompt"])
        except DataError as e:
            raise DataError(f"{source!r}, record {i}: {e}") from None
        if isinstance(record["prompt"], str) and not record["prompt"].strip():
            raise DataError(f"{source!r}, record {i}: the prompt is empty")
        out.append(record)
    return out
