from __future__ import annotations

from pathlib import Path

import pytest

from continual.config import ConfigError, Settings, load_settings
from continual.store import store_url

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_every_section_loads_from_the_repository_config() -> None:
    s = load_settings(ROOT / "config.toml", env={})
    for section in Settings.model_fields:
        assert getattr(s, section) is not None
    assert s.model.architecture == "efficientnet_lite0"
    assert s.model.input.kind == "image" and s.model.input.mean == (0.5, 0.5, 0.5)
    assert s.training.strategy == "replay+ewc"
    url = s.resolved_store().url
    assert url.startswith("sqlite:///") and url.endswith("continual.db")


def test_the_repository_config_sets_every_key_explicitly() -> None:
    import tomllib

    data = tomllib.loads((ROOT / "config.toml").read_text())

    def missing(model: type, node: dict, where: str) -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                out += missing(ann, node.get(name, {}), f"{where}.{name}".lstrip("."))
            elif name not in node:
                out.append(f"{where}.{name}")
        return out

    assert missing(Settings, data, "") == []


def test_a_typo_in_a_key_names_the_key_and_suggests(tmp_path: Path) -> None:
    p = write(tmp_path, "[training]\nlearning_rte = 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(p, env={})
    msg = str(exc.value)
    assert "learning_rte" in msg and "[training]" in msg and "did you mean 'learning_rate'" in msg


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key \[trainig\].*did you mean 'training'"):
        load_settings(write(tmp_path, "[trainig]\nepochs = 3\n"), env={})


def test_a_bad_value_names_key_value_and_allowed_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(write(tmp_path, "[store]\nholdout_fraction = 1.5\n"), env={})
    msg = str(exc.value)
    assert "[store] holdout_fraction" in msg and "1.5" in msg and "< 1" in msg


def test_a_bad_choice_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[training\] strategy = 'forgetful'.*'naive'"):
        load_settings(write(tmp_path, '[training]\nstrategy = "forgetful"\n'), env={})


def test_wrong_type_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[service\] port = 'eighty'"):
        load_settings(write(tmp_path, '[service]\nport = "eighty"\n'), env={})


def test_env_override_wins(tmp_path: Path) -> None:
    p = write(tmp_path, "[training]\nepochs = 3\n[store]\nurl = 'sqlite:///a.db'\n")
    env = {
        "CONTINUAL_TRAINING__EPOCHS": "7",
        "CONTINUAL_STORE__URL": "postgresql+psycopg://u@h/db",
        "CONTINUAL_AUTH__ADMIN_TOKENS": "a1,a2",
        "CONTINUAL_MODEL__INPUT__SIZE": "[96, 96]",
        "CONTINUAL_GATE__SHADOW": "true",
        "UNRELATED": "x",
    }
    s = load_settings(p, env=env)
    assert s.training.epochs == 7
    assert s.store.url == "postgresql+psycopg://u@h/db"
    assert s.auth.admin_tokens == ("a1", "a2")
    assert s.model.input.size == (96, 96)
    assert s.gate.shadow is True


def test_bad_env_override_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[training\] epochs = 'many'"):
        load_settings(write(tmp_path, ""), env={"CONTINUAL_TRAINING__EPOCHS": "many"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_cross_field_rules(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_new_samples"):
        load_settings(write(tmp_path, "[triggers]\nmin_new_samples = 10\nmax_new_samples = 5\n"), env={})
    with pytest.raises(ConfigError, match="one value per channel"):
        load_settings(write(tmp_path, "[model.input]\nchannels = 1\n"), env={})


def test_tokens_from_files_and_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "admin").write_text("# admins\nsecret-admin\n\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    p = write(tmp_path, '[auth]\ningest_tokens = ["i1"]\nadmin_tokens_file = "admin"\n')
    s = load_settings(p, env={})
    assert s.tokens("ingest") == {"i1"}
    assert s.tokens("admin") == {"secret-admin"}
    bad = load_settings(write(tmp_path, '[auth]\nadmin_tokens_file = "/nonexistent/tokens"\n'), env={})
    with pytest.raises(ConfigError, match="/nonexistent/tokens"):
        bad.tokens("admin")


def test_password_file_goes_into_the_store_url(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    p = write(
        tmp_path, f"[store]\nurl = 'postgresql+psycopg://app@db/continual'\npassword_file = '{tmp_path / 'pw'}'\n"
    )
    settings = load_settings(p, env={})
    assert store_url(settings.resolved_store()) == "postgresql+psycopg://app:s3cret@db/continual"
    assert "s3cret" not in settings.resolved_store().url  # what goes to a worker names the file, not the secret
