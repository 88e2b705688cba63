"""RL prompt datasets: local jsonl/json/parquet, answer extraction, the offline GSM8K and
AIME 2025 sets, malformed rows, the DAPO-Math-17k layout and chat templates."""

import json
import re
import time

import pandas as pd
import pytest

from torchtitan_mtp.data.datasets import (
    BOXED_PROMPT_TEMPLATE,
    PromptRecord,
    aime2025,
    apply_chat_template,
    extract_boxed,
    extract_gsm8k_answer,
    gsm8k_splits,
    gsm8k_test,
    load_chat_template,
    load_prompt_dataset,
)
from torchtitan_mtp.data.records import Problem
from torchtitan_mtp.rewards import MathVerifyReward


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ loading


def test_jsonl_with_custom_columns_template_and_gsm8k_answers(tmp_path):
    path = _jsonl(
        tmp_path / "train.jsonl",
        [
            {"problem": "How many?", "solution": "3 + 4 = 7\n#### 7", "extra": 1},
            "",  # blank lines are skipped; row numbers stay file lines
            {"problem": "How much?", "solution": "It costs\n#### 1,234", "extra": 2},
        ],
    )
    records = load_prompt_dataset(
        path,
        prompt_column="problem",
        answer_column="solution",
        prompt_template="Q: {prompt}\nA:",
        answer_transform="gsm8k",
    )
    assert records == [
        PromptRecord("Q: How many?\nA:", "7", str(path), 1),
        PromptRecord("Q: How much?\nA:", "1234", str(path), 3),
    ]
    assert isinstance(records[0], Problem)  # what the trainer consumes
    assert records[0].prompt == "Q: How many?\nA:" and records[0].answer == "7"
    with pytest.raises(AttributeError):
        records[0].answer = "8"  # frozen
    assert (
        len(
            load_prompt_dataset(
                path,
                prompt_column="problem",
                answer_column="solution",
                answer_transform="gsm8k",
                limit=1,
            )
        )
        == 1
    )


def test_parquet_and_json_files(tmp_path):
    frame = pd.DataFrame({"q": ["1+1?", "2+2?"], "a": ["2", "4"], "id": [0, 1]})
    frame.to_parquet(tmp_path / "p.parquet")
    records = load_prompt_dataset(
        tmp_path / "p.parquet",
        prompt_column="q",
        answer_column="a",
        prompt_template=BOXED_PROMPT_TEMPLATE,
    )
    assert [r.answer for r in records] == ["2", "4"] and [r.row for r in records] == [1, 2]
    assert records[0].prompt.startswith("1+1?\n") and records[0].prompt.endswith("\\boxed{}.")

    (tmp_path / "a.json").write_text(json.dumps([{"question": "x?", "answer": 5}]))
    (record,) = load_prompt_dataset(tmp_path / "a.json")
    assert (record.prompt, record.answer) == ("x?", "5")  # an int answer becomes a string


def test_answer_transforms():
    assert extract_gsm8k_answer("a\nb #### 1,234") == "1234"
    assert extract_gsm8k_answer("#### -5") == "-5"
    assert extract_gsm8k_answer("#### 3.50") == "3.50"
    with pytest.raises(ValueError, match="####"):
        extract_gsm8k_answer("no marker 5")
    assert extract_boxed("so \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    with pytest.raises(ValueError, match="boxed"):
        extract_boxed("none")


def test_template_and_path_errors(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"doubled"):
        load_prompt_dataset(path, prompt_template="{prompt} in \\boxed{}")
    with pytest.raises(ValueError, match=r"does not contain \{prompt\}"):
        load_prompt_dataset(path, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="answer_transform = 'nope'"):
        load_prompt_dataset(path, answer_transform="nope")
    with pytest.raises(FileNotFoundError, match="openai/gsm8k"):
        load_prompt_dataset("openai/gsm8k")
    with pytest.raises(ValueError, match=r"no column 'problem'.*\['answer', 'question'\]"):
        load_prompt_dataset(path, prompt_column="problem")


# ------------------------------------------------------------------ malformed rows


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"answer": "1"}, r"line 3: column 'question' is missing or null"),
        ({"question": None, "answer": "1"}, r"line 3: column 'question' is missing or null"),
        ({"question": "q"}, r"line 3: column 'answer' is missing or null"),
        ({"question": ["q"], "answer": "1"}, r"line 3: column 'question' is a list, not a string"),
        ({"question": "  ", "answer": "1"}, r"line 3: column 'question' is empty"),
        ({"question": "q", "answer": "no marker"}, r"line 3: column 'answer': no '####'"),
        ('{"question": "q", "answer": ', r"line 3: malformed JSON"),
        ("[1, 2]", r"line 3: expected a JSON object"),
    ],
)
def test_malformed_jsonl_rows_name_file_line_and_column(tmp_path, bad_row, message):
    good = {"question": "ok", "answer": "#### 1"}
    path = _jsonl(tmp_path / "broken.jsonl", [good, good, bad_row, good])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        load_prompt_dataset(path, answer_transform="gsm8k")


def test_malformed_parquet_row_names_file_and_row(tmp_path):
    path = tmp_path / "broken.parquet"
    pd.DataFrame({"question": ["a", None, "c"], "answer": ["1", "2", "3"]}).to_parquet(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": row 2: column 'question'"):
        load_prompt_dataset(path)


# ------------------------------------------------------------------ DAPO-Math-17k layout


def _dapo_row(question: str, answer: str, index: int) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": question, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"id-{index}"},
    }


def test_dapo_layout(tmp_path):
    path = tmp_path / "dapo-math-17k.parquet"
    rows = [_dapo_row("Solve 1+1. Answer: $Answer", "2", 0), _dapo_row("Find 2*3.", "6", 1)]
    pd.DataFrame(rows + rows).to_parquet(path)  # the real file repeats its problems
    records = load_prompt_dataset(path, layout="dapo")
    assert [(r.prompt, r.answer, r.row) for r in records][:2] == [
        ("Solve 1+1. Answer: $Answer", "2", 1),
        ("Find 2*3.", "6", 2),
    ]
    assert len(records) == 4
    assert len(load_prompt_dataset(path, layout="dapo", dedupe=True)) == 2

    bad = dict(_dapo_row("q", "1", 2), prompt=[{"role": "system", "content": "s"}])
    pd.DataFrame([rows[0], bad]).to_parquet(path)
    with pytest.raises(ValueError, match=r"row 2: column 'prompt' has no message with role"):
        load_prompt_dataset(path, layout="dapo")


# ------------------------------------------------------------------ ready-made sets


def test_gsm8k_test_and_its_train_heldout_split():
    records = gsm8k_test()
    assert len(records) == 1319
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", r.answer) for r in records)
    assert records[0].answer == "18" and records[0].row == 1
    train, heldout = gsm8k_splits()
    assert (len(train), len(heldout)) == (1000, 319)
    assert not set(train) & set(heldout) and set(train) | set(heldout) == set(records)
    assert (train, heldout) == gsm8k_splits()
    assert gsm8k_splits(seed=1)[0] != train


def test_aime2025_has_30_integer_answers():
    records = aime2025()
    assert len(records) == 30
    assert all(re.fullmatch(r"\d+", r.answer) for r in records)
    assert records[0].answer == "70" and records[0].source.endswith("aime2025-I.jsonl")
    assert records[15].source.endswith("aime2025-II.jsonl")


def test_math_verify_accepts_every_gsm8k_and_aime_gold():
    records = gsm8k_test() + aime2025()
    with MathVerifyReward(workers=2, timeout_s=5.0) as reward:
        t0 = time.monotonic()
        scores = reward.score_batch(
            [f"The answer is \\boxed{{{r.answer}}}." for r in records],
            [r.answer for r in records],
        )
        elapsed = time.monotonic() - t0
        assert scores == [1.0] * len(records)
        assert reward.score_batch([r.answer for r in records], [r.answer for r in records]) == [
            1.0
        ] * len(records)
        assert reward.stats()["ok"] == 2 * len(records)
    print(f"\nmath_verify on {len(records)} golds: {elapsed:.2f} s")


# ------------------------------------------------------------------ chat templates

TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_chat_template_from_tokenizer_config(tmp_path):
    config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(dict(config, chat_template=TINY_TEMPLATE))
    )
    records = [PromptRecord("What is 2+2?", "4", "f.jsonl", 1)]
    (rendered,) = apply_chat_template(records, tmp_path)
    assert rendered.prompt == "<s><|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"
    assert (rendered.answer, rendered.source, rendered.row) == ("4", "f.jsonl", 1)
    (with_system,) = apply_chat_template(records, tmp_path, system_prompt="Be brief.")
    assert with_system.prompt.startswith("<s><|system|>\nBe brief.</s>\n<|user|>")

    # chat_template.jinja (newer HF layout) when the config has none; a missing one errors.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        load_chat_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(TINY_TEMPLATE)
    assert apply_chat_template(records, tmp_path) == [rendered]

    # An explicit template; raise_exception() as HF templates use it.
    (plain,) = apply_chat_template(records, chat_template="[{{ messages[0]['content'] }}]")
    assert plain.prompt == "[What is 2+2?]"
    with pytest.raises(Exception, match="only user"):
        apply_chat_template(records, chat_template="{{ raise_exception('only user') }}")


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"question": ["q"], "answer": "1"}, r"line 3: column 'question' is a list, not a string"),
        ('{"question": "q", "answer": ', r"line 3: malformed JSON"),
        ("[1, 2]", r"line 3: expected a JSON object"),
    ],
)
def test_skipped_rows_are_left_out_and_described(tmp_path, bad_row, message):
    good = [{"question": f"q{i}", "answer": "#### 1"} for i in range(3)]
    path = _jsonl(tmp_path / "broken.jsonl", [good[0], good[1], bad_row, good[2]])
    skipped: list[str] = []
    records = load_prompt_dataset(path, answer_transform="gsm8k", skipped=skipped)
    assert [r.prompt for r in records] == ["q0", "q1", "q2"]
    assert [r.row for r in records] == [1, 2, 4]
    assert len(skipped) == 1 and re.match(re.escape(str(path)) + ": " + message, skipped[0])


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(
        b'{"question": "1+1=", "answer": "2"}\n{"question": "a\xff\xfe", "answer": "3"}\n'
    )
    with pytest.raises(ValueError, match=re.escape(f"{path}: line 2: invalid UTF-8 at byte")):
        load_prompt_dataset(path)
    skipped: list[str] = []
    assert [r.answer for r in load_prompt_dataset(path, skipped=skipped)] == ["2"]
    assert "line 2: invalid UTF-8" in skipped[0]


# ------------------------------------------------------------------ the job's splits


def _file_job(tmp_path, rows, *extra):
    from torchtitan_mtp.config import parse_job_config

    path = _jsonl(tmp_path / "prompts.jsonl", rows)
    args = ["--job.config_file", "train_configs/debug_occ.toml", "--training.steps", "0"]
    args += ["--data.name", "file", "--data.path", str(path), *extra]
    return parse_job_config(args), path


def test_a_prompt_longer_than_the_model_is_named_at_load(tmp_path):
    from torchtitan_mtp.data.tasks import rl_prompt_splits

    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(36)]
    rows[20]["question"] = "1" * 100_000 + "+1="
    config, path = _file_job(tmp_path, rows, "--data.num_heldout", "4")
    with pytest.raises(ValueError) as e:
        rl_prompt_splits(config)
    assert f"{path}: line 21: the prompt is 100004 tokens" in str(e.value)
    assert "rollout.max_new_tokens = 8 it exceeds training.seq_len = 16" in str(e.value)
    config.data.skip_invalid_rows = True
    train, heldout = rl_prompt_splits(config)
    assert len(train) + len(heldout) == 35 and all(len(p.prompt) < 10 for p in train)


def test_num_heldout_that_takes_every_row_is_an_error(tmp_path):
    from torchtitan_mtp.data.tasks import rl_prompt_splits

    rows = [{"question": f"{i}+1=", "answer": str(i + 1)} for i in range(3)]
    config, path = _file_job(tmp_path, rows, "--data.num_heldout", "4")
    with pytest.raises(ValueError, match=r"has 3 usable rows, and data.num_heldout = 4"):
        rl_prompt_splits(config)


def test_chat_template_environment_is_transformers_like():
    from torchtitan_mtp.data.datasets import render_chat_template

    template = (
        "{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}"
        "{% generation %}<{{ m.role }}>{{ m.content | tojson }}{% endgeneration %}"
        "{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    messages = [{"role": "user", "content": "é"}, {"role": "stop", "content": ""},
                {"role": "user", "content": "never"}]  # fmt: skip
    assert render_chat_template(template, messages) == '<user>"é"4'
