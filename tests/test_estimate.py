"""Estimates before a run and their calibration (docs/cost.md#estimate), checked against the truth."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from report_files import (
    make_rows,
    reference_cost,
    write_results,
)

from batchrunner.config.pricing import BUILTIN_PRICES, PriceTable
from batchrunner.config.settings import RunConfig
from batchrunner.errors import InputError, UsageError
from batchrunner.reports.estimate import estimate
from batchrunner.reports.render import estimate_to_json, render_estimate, to_json

# --- estimate ----------------------------------------------------------------------------------

TRUE_TOKEN = re.compile(r"\w{1,4}|[^\w\s]")  # the "real" tokenizer of the generated dataset
SYSTEM = "You are a careful assistant. Answer briefly."
MAX_TOKENS = 256


def true_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return 3 + sum(4 + len(TRUE_TOKEN.findall(m["content"])) for m in messages)


def generated_prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, int(rng.integers(2, 11)))) for _ in range(500)]
    prompts = []
    for _ in range(n):
        words = rng.choice(vocab, int(rng.integers(5, 150)))
        prompts.append(" ".join(words) + "?")
    return prompts


def true_completions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    return np.minimum(rng.gamma(3.0, 30.0, n).astype(int) + 1, MAX_TOKENS)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def finished_run(path: Path, prompts: list[str], completions: np.ndarray,
                 model: str = "gpt-4o", system: str | None = SYSTEM) -> Path:
    """Results of a run of `prompts` (input columns id and prompt carried), usage true."""
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        p = true_prompt_tokens(messages)
        rows.append({
            "id": f"c{i}", "input_id": f"c{i}", "prompt": prompt, "status": "ok",
            "model": model, "prompt_tokens": p, "completion_tokens": int(completion),
            "total_tokens": p + int(completion), "cached_tokens": 0, "latency_ms": 100.0,
        })
    rows.append({"id": "bad", "input_id": "bad", "prompt": "x", "status": "error",
                 "model": model, "error": "server error"})  # ignored: no usage
    carried = {"input_id": pa.string(), "prompt": pa.string()}
    return write_results(path, rows, carried=carried)


def width(r: Any) -> float:
    return r.high - r.low


def test_estimate_contains_the_truth_and_calibration_narrows_it(tmp_path: Path) -> None:
    n = 1500
    prompts = generated_prompts(n, seed=1)
    completions = true_completions(n, seed=1)
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"id": f"q{i}", "prompt": p} for i, p in enumerate(prompts)])
    config = RunConfig(input=source, output=tmp_path / "out.parquet", model="gpt-4o",
                       system=SYSTEM, params={"max_tokens": MAX_TOKENS, "temperature": 0})
    truth_prompt = sum(true_prompt_tokens([{"role": "system", "content": SYSTEM},
                                           {"role": "user", "content": p}]) for p in prompts)
    truth_completion = int(completions.sum())
    price = BUILTIN_PRICES["gpt-4o"]
    truth_cost = reference_cost(price, truth_prompt, truth_completion, 0)

    prices = PriceTable.load()
    rough = estimate(config, prices=prices)
    assert rough.rows == rough.rows_to_send == n and rough.input_errors == 0
    assert rough.calibration is None
    assert rough.prompt_tokens.low <= truth_prompt <= rough.prompt_tokens.high
    assert rough.completion_tokens.low == n  # one token a row at least
    assert rough.completion_tokens.high == n * MAX_TOKENS
    assert rough.completion_tokens.expected is None  # nothing to say where, before calibrating
    assert rough.completion_tokens.low <= truth_completion <= rough.completion_tokens.high
    assert rough.cost_usd is not None
    assert rough.cost_usd.low <= truth_cost <= rough.cost_usd.high
    # The cost bounds are the table's prices applied to the token bounds.
    assert rough.cost_usd.low == pytest.approx(reference_cost(
        price, rough.prompt_tokens.low, rough.completion_tokens.low, 0))
    assert rough.cost_usd.high == pytest.approx(reference_cost(
        price, rough.prompt_tokens.high, rough.completion_tokens.high, 0))

    # Calibrate on another run of prompts of the same kind.
    other = finished_run(tmp_path / "earlier.parquet", generated_prompts(800, seed=2),
                         true_completions(800, seed=2))
    tight = estimate(config, prices=prices, calibrate=[other])
    assert tight.calibration is not None and tight.calibration.rows == 800
    for name, truth in (("prompt_tokens", truth_prompt), ("completion_tokens", truth_completion),
                        ("cost_usd", truth_cost)):
        calibrated, uncalibrated = getattr(tight, name), getattr(rough, name)
        assert calibrated.low <= truth <= calibrated.high, name
        assert width(calibrated) < 0.5 * width(uncalibrated), name
        assert calibrated.expected == pytest.approx(truth, rel=0.06), name


def test_estimate_input_errors_unpriced_models_and_no_max_tokens(tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "prompt": "Hello there, how are you?"}),
        json.dumps({"id": "b", "prompt": ""}),  # an input error: not sent
        "{not json",  # an input error too
        json.dumps({"id": "c", "prompt": "Price me", "model": "mystery-9"}),
        json.dumps({"id": "d", "messages": [{"role": "user", "content": "Hi"}]}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o-mini",
                       messages_column="messages", prompt_column="prompt")
    est = estimate(config, prices=PriceTable.load())
    assert (est.rows, est.rows_to_send, est.input_errors) == (5, 3, 2)
    assert est.unpriced_rows == 1 and est.unpriced_models == ("mystery-9",)
    assert est.cost_usd is None  # unknown, not silently low
    assert est.cost_usd_known.low > 0 and est.cost_usd_known.high is None
    assert est.completion_tokens.high is None and est.unbounded_rows == 3
    # The documented rule: characters / 4 + 4 a message + 3 a request.
    chars = len("Hello there, how are you?") + len("Price me") + len("Hi")
    assert est.chars == chars and est.messages == 3
    assert est.prompt_tokens.expected == round(chars / 4 + 4 * 3 + 3 * 3)
    text = render_estimate(est)
    assert "no bound" in text and "no price" in text and "2 with input errors" in text
    data = json.loads(estimate_to_json(est))
    assert data["cost_usd"] is None and data["unpriced_models"] == ["mystery-9"]
    assert data["prompt_tokens"]["expected"] == est.prompt_tokens.expected
    assert {m["model"] for m in data["models"]} == {"gpt-4o-mini", "mystery-9"}
    assert json.loads(to_json(est)) == data


def test_estimate_counts_choices_and_respects_limit(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"prompt": f"question number {i}"} for i in range(50)])
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o",
                       params={"max_tokens": 10, "n": 3}, limit=20)
    est = estimate(config, prices=PriceTable.load())
    assert est.rows == 20
    assert est.completion_tokens.low == 20 * 3 and est.completion_tokens.high == 20 * 3 * 10


def test_calibration_with_a_template_job_and_a_renamed_model_column(tmp_path: Path) -> None:
    questions = generated_prompts(300, seed=7)
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"question": q, "model": "gpt-4o-mini"} for q in questions])
    config = RunConfig(input=source, output=tmp_path / "o.parquet", template="Q: {question}",
                       params={"max_tokens": 100})
    rows = []
    for i, q in enumerate(questions[:200]):
        p = true_prompt_tokens([{"role": "user", "content": f"Q: {q}"}])
        rows.append({"id": str(i), "question": q, "input_model": "gpt-4o-mini",
                     "model": "gpt-4o-mini", "status": "ok", "prompt_tokens": p,
                     "completion_tokens": 40, "total_tokens": p + 40, "cached_tokens": p // 4})
    cal = write_results(tmp_path / "cal.parquet", rows,
                        carried={"question": pa.string(), "input_model": pa.string()})
    est = estimate(config, prices=PriceTable.load(), calibrate=[cal])
    assert est.calibration is not None
    truth = sum(true_prompt_tokens([{"role": "user", "content": f"Q: {q}"}]) for q in questions)
    assert est.prompt_tokens.low <= truth <= est.prompt_tokens.high
    assert est.completion_tokens.expected == 300 * 40
    assert est.calibration.cached_fraction == pytest.approx(0.25, abs=0.01)
    # cached prompt tokens lower the expected cost; the high bound assumes no cache hit
    price = BUILTIN_PRICES["gpt-4o-mini"]
    f = est.calibration.cached_fraction
    assert est.cost_usd is not None
    assert est.cost_usd.expected == pytest.approx(reference_cost(
        price, est.prompt_tokens.expected, est.completion_tokens.expected,
        est.prompt_tokens.expected * f))
    assert "calibrated on 200 rows" in render_estimate(est)


def test_calibration_files_that_cannot_be_used(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hello"}])
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o")
    no_prompts = write_results(tmp_path / "np.parquet", make_rows(5, 1), carried={})
    with pytest.raises(UsageError, match="neither the input columns"):
        estimate(config, prices=PriceTable.load(), calibrate=[no_prompts])
    all_failed = write_results(tmp_path / "failed.parquet",
                               [{"id": "1", "prompt": "x", "status": "error", "model": "gpt-4o"}])
    with pytest.raises(UsageError, match="no ok row"):
        estimate(config, prices=PriceTable.load(), calibrate=[all_failed])
    with pytest.raises(UsageError, match="nothing-here"):
        estimate(config, prices=PriceTable.load(), calibrate=[tmp_path / "nothing-here*"])


def test_estimate_of_an_unusable_input_is_an_input_error(tmp_path: Path) -> None:
    config = RunConfig(input=tmp_path / "absent.jsonl", output=tmp_path / "o.parquet",
                       model="gpt-4o")
    with pytest.raises(InputError):
        estimate(config, prices=PriceTable.load())


# --- the Batch API's price and the prompt cache ------------------------------------------------


def _doc_qa(tmp_path: Path, documents: int = 5, questions: int = 4) -> Path:
    """Questions about long documents: each document (about 1,600 tokens) first, the question
    last, shuffled so that a document's questions are spread over the input."""
    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    docs = [" ".join(rng.choice(words, 1300)) for _ in range(documents)]
    records = [{"id": f"d{d}q{q}", "prompt": f"{docs[d]}\n\nQuestion {q}: what about {q}?"}
               for d in range(documents) for q in range(questions)]
    order = rng.permutation(len(records))
    return write_jsonl(tmp_path / "docqa.jsonl", [records[i] for i in order])


def test_estimate_gives_the_online_and_the_batch_cost_side_by_side(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl",
                         [{"id": i, "prompt": p} for i, p in enumerate(generated_prompts(40, 1))])
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o",
                       params={"max_tokens": 64})
    est = estimate(config, prices=PriceTable.load())
    for name in ("low", "expected", "high"):
        online, batch = getattr(est.cost_usd, name), getattr(est.batch_cost_usd, name)
        if online is not None:
            assert batch == pytest.approx(online / 2)
    (model,) = est.models
    assert model.batch_cost_usd.high == pytest.approx(model.cost_usd.high / 2)
    text = render_estimate(est)
    assert "cost (USD), online (this job):" in text and "cost (USD), batch:" in text
    assert "batch (USD)" in text  # the per-model table's column
    data = json.loads(estimate_to_json(est))
    assert data["batch_cost_usd"]["high"] == pytest.approx(data["cost_usd"]["high"] / 2)
    assert data["models"][0]["batch_cost_usd"] is not None
    as_batch = estimate(config.replace(engine="batch"), prices=PriceTable.load())
    assert "cost (USD), batch (this job):" in render_estimate(as_batch)
    # a model with no price: both unknown, the priced rows' figure said
    unpriced = estimate(config.replace(model="no-such-model"), prices=PriceTable.load())
    assert unpriced.cost_usd is None and unpriced.batch_cost_usd is None


def test_estimate_says_what_the_prompt_cache_saves_with_the_prefix_order(tmp_path: Path) -> None:
    from batchrunner.inputs.prefixes import cacheable_tokens

    source = _doc_qa(tmp_path)
    config = RunConfig(input=source, output=tmp_path / "o.parquet", model="gpt-4o",
                       params={"max_tokens": 32})
    est = estimate(config, prices=PriceTable.load())
    # five documents of four questions: the first question of each pays in full, the other
    # three have their document's cacheable prefix cached (in steps of 128, at most a step
    # short of the whole prompt's cacheable part)
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    whole = [cacheable_tokens({"messages": [{"role": "user", "content": r["prompt"]}]})
             for r in rows]
    assert 15 * (min(whole) - 128) <= est.prefix_cached_tokens <= 15 * max(whole)
    assert est.prefix_cached_tokens % 128 == 0
    assert 0.6 < est.prefix_cached_share < 0.75  # 15 of 20 rows, most of each prompt
    price = BUILTIN_PRICES["gpt-4o"]
    assert est.cache_saving_usd == pytest.approx(
        est.prefix_cached_tokens * (price.input - price.cached_input) / 1e6)
    assert est.cache_saving_batch_usd == pytest.approx(est.cache_saving_usd / 2)
    text = render_estimate(est)
    assert f"of prompt tokens ({est.prefix_cached_tokens:,}) expected cached" in text
    assert f"saving ${est.cache_saving_usd:,.6f} online" in text
    assert json.loads(estimate_to_json(est))["prefix_cached_tokens"] == est.prefix_cached_tokens
    # the input order is said to expect less; short prompts share nothing
    assert "this job sends in input order" in render_estimate(
        estimate(config.replace(order="input"), prices=PriceTable.load()))
    short = write_jsonl(tmp_path / "short.jsonl",
                        [{"id": i, "prompt": "same question"} for i in range(10)])
    none = estimate(config.replace(input=short), prices=PriceTable.load())
    assert none.prefix_cached_tokens == 0 and none.cache_saving_usd == 0
    assert "nothing expected cached" in render_estimate(none)
