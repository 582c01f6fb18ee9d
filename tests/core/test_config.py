"""Config layering, one-line errors naming the key, token file permissions, atomic persist."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from provider.config import (
    MIN_TOKEN_LENGTH,
    ConfigError,
    ensure_provider_id,
    load_config,
    persist_keys,
)

URL = "ws://127.0.0.1:9/ws/provider"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_layers_file_env_flags(tmp_path: Path) -> None:
    f = write(
        tmp_path / "c.toml", f'coordinator_url = "{URL}"\nmodel = "/m"\nmax_concurrency = 2\n'
    )
    env = {"MLX_PROVIDER_MAX_CONCURRENCY": "3", "MLX_PROVIDER_DRAIN_TIMEOUT_S": "7.5"}
    cfg, path = load_config(f, environ=env)
    assert (cfg.max_concurrency, cfg.drain_timeout_s, path) == (3, 7.5, f)
    cfg, _ = load_config(f, environ=env, overrides={"max_concurrency": 4, "model": None})
    assert cfg.max_concurrency == 4 and cfg.model == "/m"


def test_prefill_slice_ms_default_env_and_flag(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", f'coordinator_url = "{URL}"\nmodel = "/m"\n')
    cfg, _ = load_config(f, environ={})
    assert cfg.prefill_slice_ms is None  # the engine picks by device: 100 ms GPU, 250 ms CPU
    cfg, _ = load_config(f, environ={"MLX_PROVIDER_PREFILL_SLICE_MS": "0"})
    assert cfg.prefill_slice_ms == 0  # off: fixed prefill_step_size chunks
    cfg, _ = load_config(f, environ={}, overrides={"prefill_slice_ms": 40.5})
    assert cfg.prefill_slice_ms == 40.5


def test_flags_alone_need_no_file(tmp_path: Path) -> None:
    cfg, path = load_config(
        None, environ={"HOME": str(tmp_path)}, overrides={"coordinator_url": URL, "model": "x"}
    )
    assert cfg.coordinator_url == URL and path.name == "config.toml"


@pytest.mark.parametrize(
    ("text", "env", "needle"),
    [
        ('max_concurrency = "lots"', {}, "max_concurrency"),
        ("bogus_key = 1", {}, "bogus_key"),
        ("", {"MLX_PROVIDER_MAX_CONCURRENCY": "zero"}, "MLX_PROVIDER_MAX_CONCURRENCY"),
        ("", {"MLX_PROVIDER_NOPE": "1"}, "MLX_PROVIDER_NOPE"),
        ("max_concurrency = 0", {}, "max_concurrency"),
        ("prefill_slice_ms = -5", {}, "prefill_slice_ms"),
        ("", {"MLX_PROVIDER_PREFILL_SLICE_MS": "soon"}, "MLX_PROVIDER_PREFILL_SLICE_MS"),
        ('status_host = "0.0.0.0"', {}, "status_host"),
        ("this is = = not toml", {}, "TOML"),
        ("kv_bits = 5", {}, "kv_bits"),
        ("", {"MLX_PROVIDER_KV_GROUP_SIZE": "48"}, "kv_group_size"),
        ('prompt_lookup = "sometimes"', {}, "prompt_lookup"),
        ("prompt_cache_bytes = -1", {}, "prompt_cache_bytes"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, env: dict, needle: str) -> None:
    f = write(tmp_path / "c.toml", f'coordinator_url = "{URL}"\nmodel = "m"\n{text}\n')
    with pytest.raises(ConfigError) as err:
        load_config(f, environ=env)
    message = str(err.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ws://example.com/ws/provider", "wss://"),
        ("wss://user:pw@example.com/ws", "credentials"),
        ("http://example.com", "scheme"),
    ],
)
def test_unsafe_urls_refused(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, environ={}, overrides={"coordinator_url": url, "model": "m"})


def test_loopback_ws_allowed() -> None:
    for url in ("ws://localhost:1/ws", "ws://[::1]:1/ws", "wss://example.com/ws/provider"):
        assert load_config(None, environ={}, overrides={"coordinator_url": url, "model": "m"})


def test_missing_required_names_fix() -> None:
    with pytest.raises(ConfigError, match="--coordinator"):
        load_config(None, environ={}, overrides={"model": "m"})


def test_token_file_with_wide_mode_is_refused(tmp_path: Path) -> None:
    f = write(
        tmp_path / "c.toml",
        f'coordinator_url = "{URL}"\nmodel = "m"\nprovider_token = "s3cret_0123456789ab"\n',
        0o644,
    )
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={})
    assert f"chmod 600 {f}" in str(err.value) and "s3cret_0123456789ab" not in str(err.value)
    os.chmod(f, 0o600)
    assert load_config(f, environ={})[0].provider_token == "s3cret_0123456789ab"


def test_persist_keys_is_atomic_and_keeps_the_rest(tmp_path: Path) -> None:
    f = write(tmp_path / "c.toml", '# mine\nmodel = "m"\n\n[extra]\nx = 1\n', 0o600)
    persist_keys(f, {"provider_token": 'new"tok', "model": "m2"})
    data = tomllib.loads(f.read_text())
    assert data == {"model": "m2", "provider_token": 'new"tok', "extra": {"x": 1}}
    assert "# mine" in f.read_text()
    assert oct(f.stat().st_mode & 0o777) == oct(0o600)
    assert [p.name for p in tmp_path.iterdir()] == ["c.toml"]  # no temp files left


def test_provider_id_generated_once(tmp_path: Path) -> None:
    f = tmp_path / "sub" / "c.toml"
    cfg, _ = load_config(None, environ={}, overrides={"coordinator_url": URL, "model": "m"})
    first = ensure_provider_id(cfg, f)
    assert first.provider_id and tomllib.loads(f.read_text())["provider_id"] == first.provider_id
    again, _ = load_config(f, environ={}, overrides={"coordinator_url": URL, "model": "m"})
    assert ensure_provider_id(again, f).provider_id == first.provider_id


def test_prefill_slice_flag_reaches_the_engine(tmp_path: Path) -> None:
    from provider.cli import build_parser, make_engine, serve_config

    f = write(tmp_path / "c.toml", f'coordinator_url = "{URL}"\n')
    args = build_parser().parse_args(
        ["serve", "--config", str(f), "--model", "/m", "--prefill-slice-ms", "50"]
    )
    config, _ = serve_config(args)
    assert config.prefill_slice_ms == 50.0
    assert make_engine(config).prefill_slice_ms == 50.0


def test_memory_and_speed_keys(tmp_path: Path) -> None:
    f = write(
        tmp_path / "c.toml",
        f'coordinator_url = "{URL}"\nmodel = "/m"\nprompt_cache_bytes = 1073741824\n'
        'draft_model = "/draft"\nkv_bits = 4\n',
    )
    env = {"MLX_PROVIDER_MEMORY_BUDGET_BYTES": "8000000000", "MLX_PROVIDER_PROMPT_LOOKUP": "off"}
    cfg, _ = load_config(f, environ=env)
    assert cfg.prompt_cache_bytes == 1 << 30 and cfg.memory_budget_bytes == 8_000_000_000
    assert (cfg.draft_model, cfg.kv_bits, cfg.kv_group_size) == ("/draft", 4, 64)
    assert (cfg.prompt_lookup, cfg.num_draft_tokens, cfg.prompt_cache_entries) == ("off", 3, 32)
    defaults, _ = load_config(None, environ={}, overrides={"coordinator_url": URL, "model": "x"})
    assert defaults.prompt_cache_bytes is None and defaults.memory_budget_bytes is None
    assert defaults.kv_bits is None and defaults.prompt_lookup == "auto"


@pytest.mark.parametrize("token", ["t", "ok", "x" * (MIN_TOKEN_LENGTH - 1)])
def test_short_token_is_refused_at_start_with_the_reason(token: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, environ={}, overrides={"coordinator_url": URL, "model": "m",
                                                 "provider_token": token})  # fmt: skip
    message = str(err.value)
    assert message.startswith(f"provider_token: {len(token)} characters is too short")
    assert f"at least {MIN_TOKEN_LENGTH}" in message and "redact" in message
    assert f" {token} " not in message and repr(token) not in message


@pytest.mark.parametrize("token", ["tok_0123456789abcdef\n", "tok 0123456789abcdef", "tok\x00" * 5])
def test_token_with_whitespace_or_control_characters_is_refused(token: str) -> None:
    env = {"MLX_PROVIDER_PROVIDER_TOKEN": token}
    with pytest.raises(ConfigError, match="whitespace or control characters"):
        load_config(None, environ=env, overrides={"coordinator_url": URL, "model": "m"})


def test_token_floor_covers_the_log_redaction_floor() -> None:
    from provider.logs import MIN_SECRET_LENGTH

    assert MIN_TOKEN_LENGTH >= MIN_SECRET_LENGTH
    config, _ = load_config(None, environ={}, overrides={"coordinator_url": URL, "model": "m",
                                                         "provider_token": "a" * 64})  # fmt: skip
    assert config.provider_token == "a" * 64
