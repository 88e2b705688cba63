"""Every shipped job file parses, validates and builds its model on the meta device."""

import copy
from pathlib import Path

import pytest
import torch
from torchtitan.protocols.train_spec import get_train_spec

from torchtitan_mtp.config import parse_job_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "train_configs").glob("*.toml"))


def test_the_default_job_and_the_regime_jobs_exist():
    names = {p.name for p in CONFIGS}
    assert {"debug_occ.toml", "detach.toml", "ce.toml", "policy.toml", "occ.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_job_file_builds_its_model_on_meta(path):
    config = parse_job_config(["--job.config_file", str(path)])
    spec = get_train_spec(config.model.name)
    args = copy.deepcopy(spec.model_args[config.model.flavor])
    args.update_from_config(config)
    with torch.device("meta"):
        model = spec.model_cls(args)
    assert model.num_mtp_modules == config.mtp.num_modules
    assert args.max_seq_len == config.training.seq_len
