"""Job files (docs/jobs.md): loading, checking, path resolution, and folding with the command line."""

from __future__ import annotations

import dataclasses
import json
import logging
import string
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrunner.config.jobs import (
    JOB_KEYS,
    PATH_KEYS,
    REQUEST_KEYS,
    build_config,
    load_job,
)
from batchrunner.config.settings import RunConfig
from batchrunner.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
JOB_FILES = sorted((ROOT / "jobs").glob("*.toml"))
FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def write_job(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(UsageError) as caught:
        load_job(path)
    return str(caught.value)


# --- the shipped job files ------------------------------------------------------------------


def input_columns(path: Path) -> set[str]:
    if path.suffix == ".parquet":
        return set(pq.read_schema(path).names)
    with path.open(encoding="utf-8") as f:
        return set(json.loads(f.readline()))


def test_there_are_job_files() -> None:
    names = {p.name for p in JOB_FILES}
    assert {"quickstart.toml", "quickstart-local.toml", "nightly-eval.toml"} <= names
    assert "bulk-generation.toml" in names


@pytest.mark.parametrize("job_file", JOB_FILES, ids=lambda p: p.name)
def test_every_job_file_builds_a_config_whose_input_exists(
    job_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # paths must not depend on where the command is run
    config = build_config(load_job(job_file), {})
    assert isinstance(config, RunConfig)
    assert config.input.is_file()
    assert config.model in ("gpt-4o", "gpt-4o-mini")
    # outputs go to the git-ignored out/ at the top of the repository
    assert config.output.parent == ROOT / "out"
    if config.summary_json is not None:
        assert config.summary_json.parent == ROOT / "out"
    columns = input_columns(config.input)
    assert "id" in columns
    if config.template:
        placeholders = {f for _, f, _, _ in string.Formatter().parse(config.template) if f}
        assert placeholders <= columns, f"{job_file.name}: template needs {placeholders - columns}"
    else:
        assert (config.prompt_column or "prompt") in columns


def test_shipped_jobs_have_the_documented_settings() -> None:
    local = build_config(load_job(ROOT / "jobs/quickstart-local.toml"), {})
    remote = build_config(load_job(ROOT / "jobs/quickstart.toml"), {})
    assert local.local and not remote.local
    assert local.output != remote.output  # simulated answers never mix with real ones
    assert local.replace(local=False, output=remote.output) == remote

    nightly = build_config(load_job(ROOT / "jobs/nightly-eval.toml"), {})
    assert nightly.params["temperature"] == 0 and isinstance(nightly.params["seed"], int)
    assert nightly.template == "Answer briefly: {question}"
    assert nightly.system and nightly.summary_json is not None
    assert nightly.deadline == "06:00"
    assert "reference" in input_columns(nightly.input)

    bulk = build_config(load_job(ROOT / "jobs/bulk-generation.toml"), {})
    assert bulk.max_cost is not None and bulk.deadline and bulk.rpm
    assert bulk.template and "max_tokens" in bulk.params


# --- keys, types and the result -------------------------------------------------------------


def test_job_keys_are_run_config_fields_less_the_per_invocation_ones() -> None:
    # a RunConfig field with no checker in jobs.py would be missing here
    assert JOB_KEYS - REQUEST_KEYS == FIELDS - {"restart", "retry_failed", "progress"}
    assert REQUEST_KEYS == {"temperature", "top_p", "max_tokens", "stop", "n", "seed"}
    assert PATH_KEYS == {"input", "output", "prices", "summary_json"}


def test_a_full_job_is_typed_and_only_given_keys_are_present(tmp_path: Path) -> None:
    path = write_job(
        tmp_path,
        """
        input = "in.jsonl"
        output = "out.parquet"
        model = "gpt-4o"
        concurrency = 4
        rpm = 120
        timeout = 30
        stream = true
        deadline = 06:30:00
        log_format = "json"
        checkpoint_every = 10
        """,
    )
    job = load_job(path)
    assert set(job) == {
        "input", "output", "model", "concurrency", "rpm", "timeout", "stream", "deadline",
        "log_format", "checkpoint_every",
    }  # fmt: skip
    assert job["concurrency"] == 4 and isinstance(job["concurrency"], int)
    assert job["rpm"] == 120.0 and isinstance(job["rpm"], float)
    assert job["stream"] is True
    assert job["deadline"] == "06:30"  # a TOML local time becomes the string form
    with_seconds = write_job(tmp_path, "deadline = 23:59:30\n", "t.toml")
    assert load_job(with_seconds) == {"deadline": "23:59:30"}
    duration = write_job(tmp_path, 'deadline = " 2h30m "\n', "d.toml")
    assert load_job(duration) == {"deadline": "2h30m"}
    config = build_config(job, {})
    assert config.max_attempts == 6  # defaults of RunConfig fill the rest
    assert "params" not in job and config.params == {}


def test_an_empty_job_file_gives_an_empty_job(tmp_path: Path) -> None:
    assert load_job(write_job(tmp_path, "# nothing yet\n")) == {}


# --- paths ----------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_job_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_job(
        tmp_path / "project" / "jobs",
        """
        input = "../data/in.jsonl"
        output = "results/out.parquet"
        prices = "prices.toml"
        summary_json = "../out/summary.json"
        """,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the job file itself named relatively, from another folder
    job = load_job(Path("../project/jobs/job.toml"))
    project = tmp_path / "project"
    assert job["input"] == project / "data" / "in.jsonl"
    assert job["output"] == project / "jobs" / "results" / "out.parquet"
    assert job["prices"] == project / "jobs" / "prices.toml"
    assert job["summary_json"] == project / "out" / "summary.json"
    assert all(job[k].is_absolute() for k in PATH_KEYS)
    assert load_job(path) == job


def test_absolute_and_home_paths_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data.jsonl"
    path = write_job(tmp_path / "jobs", f'input = "{data.as_posix()}"\noutput = "~/out.parquet"\n')
    job = load_job(path)
    assert job["input"] == data
    assert job["output"] == tmp_path / "home" / "out.parquet"


def test_paths_on_the_command_line_are_taken_as_given(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, 'input = "in.jsonl"\noutput = "out.parquet"\n'))
    config = build_config(job, {"output": "elsewhere/x.parquet", "prices": "p.toml"})
    assert config.output == Path("elsewhere/x.parquet")
    assert config.prices == Path("p.toml")
    assert config.input == tmp_path / "in.jsonl"


# --- command line over file -----------------------------------------------------------------


def test_command_line_overrides_the_job_file(tmp_path: Path) -> None:
    job = load_job(
        write_job(
            tmp_path,
            """
            input = "in.jsonl"
            output = "out.parquet"
            model = "gpt-4o"
            concurrency = 4
            stream = true
            quiet = true
            """,
        )
    )
    config = build_config(
        job,
        {"model": "gpt-4o-mini", "concurrency": 32, "stream": False, "limit": None, "rpm": None},
    )
    assert config.model == "gpt-4o-mini"
    assert config.concurrency == 32
    assert config.stream is False  # an explicit false on the command line wins too
    assert config.quiet is True  # not given on the command line: the file's value
    assert config.limit is None and config.rpm is None  # None means "not given"


def test_params_merge_key_by_key_with_the_command_line_winning(tmp_path: Path) -> None:
    job = load_job(
        write_job(
            tmp_path,
            """
            input = "in.jsonl"
            output = "out.parquet"
            temperature = 0
            seed = 7

            [params]
            max_tokens = 64
            response_format = { type = "json_object" }
            """,
        )
    )
    config = build_config(
        job,
        {
            "temperature": 0.5,
            "params": {"max_tokens": 128, "user": "nightly"},
            "stop": (),  # click's "not given" for a repeatable option
            "n": None,
        },
    )
    assert config.params == {
        "temperature": 0.5,
        "seed": 7,
        "max_tokens": 128,
        "response_format": {"type": "json_object"},
        "user": "nightly",
    }
    assert job["params"]["temperature"] == 0  # the job itself is not changed


def test_stop_from_the_command_line_becomes_a_list() -> None:
    config = build_config(None, {"input": "a.jsonl", "output": "b.parquet", "stop": ("END", "##")})
    assert config.params == {"stop": ["END", "##"]}


def test_a_named_option_and_the_same_param_together_are_refused() -> None:
    with pytest.raises(UsageError, match="--max-tokens and --param max_tokens"):
        build_config(
            None,
            {"input": "a", "output": "b", "max_tokens": 10, "params": {"max_tokens": 20}},
        )


def test_command_line_values_are_checked_and_named_as_options() -> None:
    with pytest.raises(UsageError, match=r"^--concurrency must be at least 1, not 0$"):
        build_config(None, {"input": "a", "output": "b", "concurrency": 0})
    with pytest.raises(UsageError, match=r"--temperature must be at most 2"):
        build_config(None, {"input": "a", "output": "b", "temperature": 3.0})
    with pytest.raises(UsageError, match=r"--deadline must be a duration"):
        build_config(None, {"input": "a", "output": "b", "deadline": "soon"})
    with pytest.raises(UsageError, match=r"--param model is not allowed"):
        build_config(None, {"input": "a", "output": "b", "params": {"model": "x"}})


def test_per_invocation_flags_come_from_the_command_line(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, 'input = "in.jsonl"\noutput = "out.parquet"\n'))
    assert build_config(job, {"restart": True}).restart is True
    assert build_config(job, {"retry_failed": True, "progress": False}).retry_failed is True
    with pytest.raises(UsageError, match="cannot be used together"):
        build_config(job, {"restart": True, "retry_failed": True})


def test_an_option_build_config_does_not_know_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="colour"):
        build_config(None, {"input": "a", "output": "b", "colour": "red"})


def test_input_and_output_are_required() -> None:
    with pytest.raises(UsageError, match=r"no input: give --input or `input` in the job file"):
        build_config(None, {"output": "b.parquet"})
    with pytest.raises(UsageError, match=r"no output: give --output or `output` in the job file"):
        build_config({"input": Path("a.jsonl")}, {"output": None})
    config = build_config(None, {"input": "a.jsonl", "output": Path("b.parquet")})
    assert config.input == Path("a.jsonl") and config.output == Path("b.parquet")


# --- request fields: top level and [params] -------------------------------------------------


def test_request_keys_at_top_level_and_in_params_are_equivalent(tmp_path: Path) -> None:
    top = write_job(
        tmp_path,
        'temperature = 0.2\ntop_p = 0.9\nmax_tokens = 50\nstop = "END"\nn = 2\nseed = 1\n',
        "top.toml",
    )
    table = write_job(
        tmp_path,
        "[params]\n"
        'temperature = 0.2\ntop_p = 0.9\nmax_tokens = 50\nstop = "END"\nn = 2\nseed = 1\n',
        "table.toml",
    )
    expected = {
        "temperature": 0.2, "top_p": 0.9, "max_tokens": 50, "stop": "END", "n": 2, "seed": 1,
    }  # fmt: skip
    assert load_job(top) == {"params": expected}
    assert load_job(table) == {"params": expected}


def test_stop_may_be_a_list(tmp_path: Path) -> None:
    job = load_job(write_job(tmp_path, 'stop = ["\\n\\n", "END"]\n'))
    assert job["params"]["stop"] == ["\n\n", "END"]


def test_params_hold_any_request_body_field(tmp_path: Path) -> None:
    job = load_job(
        write_job(
            tmp_path,
            """
            [params]
            presence_penalty = 0.5
            logit_bias = { "50256" = -100 }
            metadata = { team = "eval", night = 3 }
            x_gateway_tag = ["a", "b"]
            """,
        )
    )
    assert job["params"] == {
        "presence_penalty": 0.5,
        "logit_bias": {"50256": -100},
        "metadata": {"team": "eval", "night": 3},
        "x_gateway_tag": ["a", "b"],
    }


def test_a_request_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, "temperature = 0\n[params]\ntemperature = 1\n")
    message = error_of(path)
    assert str(path) in message and "`temperature` is given twice" in message


@pytest.mark.parametrize("key", ["model", "messages", "stream"])
def test_params_may_not_hold_what_options_set(tmp_path: Path, key: str) -> None:
    path = write_job(tmp_path, f'[params]\n{key} = "x"\n')
    message = error_of(path)
    assert f"`params.{key}` is not allowed" in message and str(path) in message


def test_params_must_be_json(tmp_path: Path) -> None:
    message = error_of(write_job(tmp_path, "[params]\nwhen = 2024-06-11\n"))
    assert "`params.when`" in message and "not a date" in message
    message = error_of(write_job(tmp_path, "[params]\nfrequency_penalty = nan\n"))
    assert "`params.frequency_penalty` must be a finite number" in message


def test_a_likely_typo_in_params_is_sent_but_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="batchrunner.config.jobs"):
        job = load_job(write_job(tmp_path, "[params]\nfrequency_penlty = 0.1\n"))
    assert job["params"] == {"frequency_penlty": 0.1}
    assert "did you mean `frequency_penalty`" in caplog.text


def test_params_must_be_a_table(tmp_path: Path) -> None:
    message = error_of(write_job(tmp_path, "params = 3\n"))
    assert "`params` must be a table, not an integer" in message


# --- errors ---------------------------------------------------------------------------------


def test_an_unknown_key_is_named_with_the_file_and_a_suggestion(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "in.jsonl"\nconcurency = 4\n')
    message = error_of(path)
    assert message == f"{path}: unknown key `concurency` (did you mean `concurrency`?)"


def test_an_option_spelt_with_dashes_suggests_the_key(tmp_path: Path) -> None:
    message = error_of(write_job(tmp_path, "max-cost = 5\n"))
    assert "unknown key `max-cost` (did you mean `max_cost`?)" in message


def test_an_unknown_key_with_nothing_close_lists_the_keys(tmp_path: Path) -> None:
    message = error_of(write_job(tmp_path, "zzz = 1\n"))
    assert "unknown key `zzz`" in message and "concurrency" in message and "summary_json" in message


def test_an_unknown_table_is_an_unknown_key(tmp_path: Path) -> None:
    message = error_of(write_job(tmp_path, '[voices."gpt-4o"]\ninput = 2.5\n'))
    assert "unknown key `voices`" in message


def test_models_is_a_sweep_and_a_table_of_models_is_refused(tmp_path: Path) -> None:
    # `models` is a job key since sweeps (docs/evaluations.md#sweeps): an array of names, nothing else
    message = error_of(write_job(tmp_path, '[models."gpt-4o"]\ninput = 2.5\n'))
    assert "`models` must be a non-empty array of model names, not a table" in message
    job = write_job(tmp_path, 'input = "in.jsonl"\noutput = "o.parquet"\n'
                              'models = ["gpt-4o", "gpt-4o-mini"]\n')
    config = build_config(load_job(job), {})
    assert config.models == ("gpt-4o", "gpt-4o-mini") and config.model == "gpt-4o"
    one = build_config(load_job(job), {"model": "claude-3-5-haiku-20241022"})
    assert one.models == () and one.model == "claude-3-5-haiku-20241022"  # -m once: no sweep


def test_a_request_field_at_the_top_level_points_to_params(tmp_path: Path) -> None:
    message = error_of(write_job(tmp_path, "presence_penalty = 0.5\n"))
    assert "`presence_penalty`" in message and "[params]" in message


@pytest.mark.parametrize(
    "key, flag", [("restart", "--restart"), ("retry_failed", "--retry-failed")]
)
def test_per_invocation_flags_are_not_job_keys(tmp_path: Path, key: str, flag: str) -> None:
    path = write_job(tmp_path, f"{key} = true\n")
    message = error_of(path)
    assert str(path) in message and f"`{key}` is not a job key" in message and flag in message


def test_a_key_in_a_job_file_is_refused_without_repeating_it(tmp_path: Path) -> None:
    secret = "sk-ru-0123456789abcdef"
    lines = (f'api_key = "{secret}"', f'api_key_env = "{secret}"', f"model = ['{secret}']")
    for text in (line + "\n" for line in lines):
        message = error_of(write_job(tmp_path, text))
        assert secret not in message
    assert "api_key_env" in error_of(write_job(tmp_path, f'api_key = "{secret}"\n'))
    assert "not the key itself" in error_of(write_job(tmp_path, f'api_key_env = "{secret}"\n'))


@pytest.mark.parametrize(
    "line, expected",
    [
        ('concurrency = "16"', "`concurrency` must be an integer, not a string"),
        ("concurrency = 16.0", "`concurrency` must be an integer, not a float"),
        ("limit = true", "`limit` must be an integer, not a boolean"),
        ('rpm = "600"', "`rpm` must be a number, not a string"),
        ("stream = 1", "`stream` must be true or false, not an integer"),
        ("model = 4", "`model` must be a string, not an integer"),
        ("input = 3", "`input` must be a path (a string), not an integer"),
        ("system = ['a']", "`system` must be a string, not an array"),
        ("stop = 5", "`stop` must be a string or a non-empty array of strings, not an integer"),
        ("stop = []", "`stop` must be a string or a non-empty array of strings, not an array"),
        ("deadline = 45", '`deadline` must be a duration such as "45m"'),
        ("deadline = 2024-06-11T06:00:00", '`deadline` must be a duration such as "45m"'),
        (
            'deadline = "tomorrow"',
            '`deadline` must be a duration such as "45m" or a time of day such as "06:00", '
            "not 'tomorrow'",
        ),
        ('deadline = "25:00"', "`deadline` must be a duration"),
        ('deadline = "0m"', "`deadline` must be a duration"),
        ("concurrency = 0", "`concurrency` must be at least 1, not 0"),
        ("max_attempts = 0", "`max_attempts` must be at least 1, not 0"),
        ("limit = -1", "`limit` must be at least 0, not -1"),
        ("max_cost = 0", "`max_cost` must be positive, not 0"),
        ("timeout = -5.0", "`timeout` must be positive, not -5.0"),
        ("tpm = inf", "`tpm` must be a finite number"),
        ("temperature = 2.5", "`temperature` must be at most 2, not 2.5"),
        ("top_p = -0.1", "`top_p` must be at least 0, not -0.1"),
        ("max_tokens = 0", "`max_tokens` must be at least 1, not 0"),
        ("n = 0", "`n` must be at least 1, not 0"),
        ("seed = 1.5", "`seed` must be an integer, not a float"),
        ('log_format = "xml"', "`log_format` must be one of text, json, not 'xml'"),
        ('base_url = "api.example.com/v1"', "`base_url` must be an http:// or https:// URL"),
        ('output = ""', "`output` must not be empty"),
        ('model = ""', "`model` must not be empty"),
        ("[params]\nmax_tokens = '64'", "`params.max_tokens` must be an integer, not a string"),
    ],
)
def test_a_bad_value_names_the_key_the_file_and_the_expected_type(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = write_job(tmp_path, line + "\n")
    message = error_of(path)
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_a_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "in.jsonl"\nmodel = "gpt-4o\nconcurrency = 4\n')
    message = error_of(path)
    assert message.startswith(f"{path}: not valid TOML")
    assert "line 2" in message


def test_a_duplicated_key_is_a_syntax_error(tmp_path: Path) -> None:
    message = error_of(write_job(tmp_path, "rpm = 1\nrpm = 2\n"))
    assert "not valid TOML" in message and "line 2" in message


def test_a_missing_or_unreadable_job_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert error_of(missing) == f"job file not found: {missing}"
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'model = "\xff\xfe"\n')
    assert error_of(binary).startswith(f"{binary}: not valid TOML")
    assert "cannot read job file" in error_of(tmp_path)  # a folder


def test_a_job_with_both_model_and_models_is_refused(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'model = "gpt-4o-mini"\nmodels = ["gpt-4o", "o1"]\n')
    message = error_of(path)
    assert str(path) in message and "`model` and `models` are both given" in message
    with pytest.raises(UsageError, match="`model` and `models` are both given"):
        build_config(None, {"input": "a", "output": "b", "model": "x", "models": ("y", "z")})


def test_param_model_on_the_command_line_points_at_the_model_option() -> None:
    from batchrunner.config.jobs import param_value

    for text in ("gpt-4o", '"gpt-4o"'):  # unquoted: no advice on quoting first
        with pytest.raises(UsageError, match=r"^--param model is not allowed: use --model"):
            param_value("model", text)
    with pytest.raises(UsageError, match=r"^--param model is not allowed: use --model"):
        build_config(None, {"input": "a", "output": "b", "params": {"model": "x"}})


# --- engines, order and several endpoints ---------------------------------------------------


def test_batch_engine_order_and_their_defaults(tmp_path: Path) -> None:
    plain = build_config(None, {"input": Path("a.jsonl"), "output": Path("o.parquet")})
    assert (plain.engine, plain.order) == ("local", "prefix")
    assert (plain.batch_poll, plain.batch_max_requests, plain.batch_max_bytes) == (
        30.0, 50_000, 190_000_000)
    job = write_job(tmp_path, """
        input = "a.jsonl"
        output = "o.parquet"
        engine = "batch"
        batch_poll = 5
        batch_max_requests = 1000
        batch_max_bytes = 1000000
        order = "input"
        """)
    config = build_config(load_job(job), {})
    assert (config.engine, config.order, config.batch_poll) == ("batch", "input", 5.0)
    assert (config.batch_max_requests, config.batch_max_bytes) == (1000, 1_000_000)
    assert build_config(load_job(job), {"order": "prefix"}).order == "prefix"
    assert "must be one of prefix, input" in error_of(write_job(tmp_path, 'order = "random"\n'))
    assert "must be one of local, ray, batch" in error_of(write_job(tmp_path, 'engine = "x"\n'))
    assert "batch_poll` must be positive" in error_of(write_job(tmp_path, "batch_poll = 0\n"))
    assert "at least 1" in error_of(write_job(tmp_path, "batch_max_bytes = 0\n"))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"engine": "batch", "stream": True}, "--stream does not apply to --engine batch"),
    ({"engine": "batch", "ray_actors": 4}, "apply to --engine ray"),
    ({"engine": "batch", "api_key_env": "KEY_A,KEY_B"}, "--engine batch sends to one endpoint"),
])
def test_nonsense_with_the_batch_engine_is_a_usage_error(
    overrides: dict, message: str
) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        build_config(None, {"input": Path("a.jsonl"), "output": Path("o.parquet"), **overrides})
    assert caught.value.exit_code == 2
    # the batch engine with --local (the simulator's Batch API) is fine
    build_config(None, {"input": Path("a.jsonl"), "output": Path("o.parquet"),
                        "engine": "batch", "local": True})


def test_a_job_names_several_endpoints(tmp_path: Path) -> None:
    from batchrunner.config.settings import Endpoint, resolve_endpoints

    job = write_job(tmp_path, """
        input = "a.jsonl"
        output = "o.parquet"
        concurrency = 8
        endpoints = [
          { base_url = "https://gw-a.example/v1/", api_key_env = "KEY_A", rpm = 600, tpm = 200000 },
          { base_url = "https://gw-b.example/v1?api-version=1", api_key_env = "KEY_B", concurrency = 4 },
        ]
        """)
    config = build_config(load_job(job), {})
    assert config.endpoints == (
        Endpoint("https://gw-a.example/v1", "KEY_A", rpm=600.0, tpm=200000.0),
        Endpoint("https://gw-b.example/v1?api-version=1", "KEY_B", concurrency=4),
    )
    assert [e.name for e in config.endpoints] == ["https://gw-a.example/v1",
                                                  "https://gw-b.example/v1"]
    resolved = resolve_endpoints(config, {"KEY_A": "sk-a", "KEY_B": "sk-b"})
    assert [(e.rpm, e.concurrency) for e in resolved] == [(600.0, 8), (None, 4)]
    # a key variable that is not set: named, with the endpoint; never a value
    with pytest.raises(UsageError, match=r"`endpoints` \[1\] .*names KEY_B, which is not set"):
        resolve_endpoints(config, {"KEY_A": "sk-a"})
    # the command line's --base-url replaces the job's endpoints
    one = build_config(load_job(job), {"base_url": "https://other.example/v1"})
    assert one.endpoints == ()


@pytest.mark.parametrize(("entries", "message"), [
    ("[]", "non-empty array"),
    ('[{ api_key_env = "K" }]', r"\[0\] has no `base_url`"),
    ('[{ base_url = "gw.example" }]', r"\[0\]\.base_url must be an http:// or https:// URL"),
    ('[{ base_url = "https://a/v1", api_key_env = "sk-live-123" }]',
     r"\[0\]\.api_key_env must be the NAME"),
    ('[{ base_url = "https://a/v1", api_key_env = "A,B" }]', "must name one variable"),
    ('[{ base_url = "https://a/v1", rpm = 0 }]', r"\[0\]\.rpm must be positive"),
    ('[{ base_url = "https://a/v1", concurency = 3 }]', "unknown key `concurency`"),
    ('["https://a/v1"]', r"\[0\] must be a table"),
])
def test_bad_endpoints_in_a_job_name_the_key(tmp_path: Path, entries: str, message: str) -> None:
    path = write_job(tmp_path, f"endpoints = {entries}\n")
    text = error_of(path)
    assert str(path) in text and "`endpoints`" in text
    assert __import__("re").search(message, text), text
    assert "sk-live-123" not in text


@pytest.mark.parametrize(("text", "message"), [
    ('base_url = "https://c/v1"\n', "--base-url and --endpoint"),
    ('api_key_env = "K"\n', "give each endpoint its `api_key_env`"),
    ("local = true\n", "--local runs against the built-in gateway simulator"),
    ('endpoints = [{ base_url = "https://b/v1", api_key_env = "K" }]\n',
     r"\[0\] and \[2\] are the same endpoint \(https://b/v1 with the same key variable K\)"),
    ('engine = "batch"\n', "--engine batch sends to one endpoint"),
])
def test_endpoints_that_conflict_are_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    job = write_job(tmp_path, """
        input = "a.jsonl"
        output = "o.parquet"
        endpoints = [{ base_url = "https://b/v1", api_key_env = "K" },
                     { base_url = "https://b/v1/", api_key_env = "L" }]
        """)
    data = load_job(job)
    extra = load_job(write_job(tmp_path, text, "extra.toml"))
    if "endpoints" in extra:
        data["endpoints"] = data["endpoints"] + extra.pop("endpoints")
    with pytest.raises(UsageError, match=message) as caught:
        build_config({**data, **extra}, {})
    assert caught.value.exit_code == 2


def test_one_endpoint_is_the_ordinary_run_and_several_keys_are_endpoints() -> None:
    from batchrunner.config.settings import Endpoint, resolve_endpoints

    base = {"input": Path("a.jsonl"), "output": Path("o.parquet")}
    plain = build_config(None, base)
    assert plain.endpoints == ()
    env = {"RU_LLM_API_KEY": "sk-x", "RU_LLM_BASE_URL": "https://env.example/v1"}
    assert resolve_endpoints(plain, env) == (
        Endpoint("https://env.example/v1", None, concurrency=16),)
    with pytest.raises(UsageError, match="no API key for https://env.example/v1"):
        resolve_endpoints(plain, {"RU_LLM_BASE_URL": "https://env.example/v1"})
    # the Ray engine's several keys: one endpoint per key at the one base URL
    keys = build_config(None, {**base, "base_url": "https://gw/v1", "api_key_env": "KA,KB"})
    assert [(e.base_url, e.api_key_env) for e in resolve_endpoints(keys, {"KA": "1", "KB": "2"})] \
        == [("https://gw/v1", "KA"), ("https://gw/v1", "KB")]
    with pytest.raises(UsageError, match="--api-key-env names KB, which is not set"):
        resolve_endpoints(keys, {"KA": "1"})


def test_endpoints_from_the_command_line_pair_urls_and_key_variables() -> None:
    from batchrunner.config.settings import Endpoint, endpoints_from_options

    assert endpoints_from_options(["https://a/v1", "https://b/v1"], ["KA", "KB"]) == (
        Endpoint("https://a/v1", "KA"), Endpoint("https://b/v1", "KB"))
    assert endpoints_from_options(["https://a/v1"], []) == (Endpoint("https://a/v1"),)
    with pytest.raises(UsageError, match="2 --endpoint and 1 --api-key-env"):
        endpoints_from_options(["https://a/v1", "https://b/v1"], ["KA"])
    with pytest.raises(UsageError, match="--endpoint #2 must be an http"):
        endpoints_from_options(["https://a/v1", "ftp://b"], ["KA", "KB"])
    with pytest.raises(UsageError, match="--api-key-env #1 must be the NAME"):
        endpoints_from_options(["https://a/v1"], ["sk-123 secret"])
    with pytest.raises(UsageError, match="one variable per --api-key-env"):
        endpoints_from_options(["https://a/v1"], ["KA,KB"])
