"""Settings precedence: CLI flag > environment > .env > default, and readable errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli
from pydantic import ValidationError

from sd35.settings import Settings, load_settings


def test_defaults(monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    s = Settings()
    assert (s.model, s.precision, s.t5, s.device, s.offload) == ("tiny", "auto", "auto", "auto", "none")
    assert s.output_dir == Path("outputs")
    assert s.revision is None and s.hf_token is None and s.hf_hub_offline is False
    assert s.hf_hub_cache.name == "hub"  # huggingface_hub's own default, under HF_HOME


def test_precedence_flag_over_env_over_dotenv_over_default(tmp_path, monkeypatch):
    Path(".env").write_text("SD35_PRECISION=bf16\nSD35_T5=off\nSD35_STEPS_TYPO=1\nHF_TOKEN=from-dotenv\n")
    s = load_settings()
    assert s.precision == "bf16" and s.t5 == "off" and s.hf_token.get_secret_value() == "from-dotenv"  # .env over default

    monkeypatch.setenv("SD35_PRECISION", "fp8-weight")
    monkeypatch.setenv("HF_TOKEN", "from-env")
    s = load_settings()
    assert s.precision == "fp8-weight" and s.hf_token.get_secret_value() == "from-env"  # environment over .env
    assert s.t5 == "off"  # untouched keys still come from .env

    s = load_settings(precision="bf16", t5=None)
    assert s.precision == "bf16"  # flag over environment
    assert s.t5 == "off"  # a flag that was not given (None) does not override


def test_hf_variables_keep_upstream_names(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "shared"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "")
    s = Settings()
    assert s.hf_hub_cache == tmp_path / "shared" and s.hf_hub_offline is True and s.hf_endpoint is None


@pytest.mark.parametrize(
    "key,value",
    [("SD35_PRECISION", "fp16"), ("SD35_T5", "int8"), ("SD35_DEVICE", "gpu0"), ("SD35_OFFLOAD", "all")],
)
def test_invalid_values_are_rejected(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_cli_reports_a_bad_env_value_without_traceback(tmp_path):
    r = run_cli("generate", env={"SD35_PRECISION": "fp16"})
    assert r.returncode == 2
    assert "SD35_PRECISION" in r.stderr and "fp16" in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "outputs").exists()


def test_every_setting_is_documented_in_env_example():
    from sd35.settings import dotenv_keys as env_keys

    documented = set(env_keys(Path(__file__).resolve().parents[1] / ".env.example", include_commented=True))
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if alias is not None else f"SD35_{name.upper()}"
        assert env in documented, f"{env} is missing from .env.example"


def test_env_example_loads_as_is(tmp_path):
    import shutil

    shutil.copy(Path(__file__).resolve().parents[1] / ".env.example", tmp_path / ".env")
    s = Settings()
    assert s.model == "tiny" and s.revision is None and s.api_key is None and s.port == 8000
