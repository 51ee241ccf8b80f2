import pytest

from dropserver.settings import DEV_JWT_SECRET, SettingsError, describe, load_settings


def test_defaults_in_dev():
    s = load_settings({}, dev=True)
    assert s.port == 8000
    assert s.hold_ttl == 600
    assert s.effective_jwt_secret == DEV_JWT_SECRET


def test_env_values_are_typed():
    s = load_settings({
        "DROPSERVER_PORT": "9001", "DROPSERVER_DEV": "true",
        "DROPSERVER_WS_PING_INTERVAL": "2.5", "DROPSERVER_CORS_ORIGINS": "http://a, http://b",
    })
    assert s.port == 9001 and s.dev is True and s.ws_ping_interval == 2.5
    assert s.cors_origins == ("http://a", "http://b")


@pytest.mark.parametrize(("var", "value"), [
    ("DROPSERVER_PORT", "eighty"),
    ("DROPSERVER_PORT", "-1"),
    ("DROPSERVER_DEV", "maybe"),
    ("DROPSERVER_WS_PING_INTERVAL", "fast"),
    ("DROPSERVER_LOG_LEVEL", "loud"),
])
def test_invalid_value_names_the_variable(var, value):
    with pytest.raises(SettingsError) as info:
        load_settings({"DROPSERVER_DEV": "1", var: value})
    assert info.value.variable == var
    assert var in str(info.value)


def test_production_needs_a_key_source():
    with pytest.raises(SettingsError) as info:
        load_settings({})
    assert info.value.variable == "DROPSERVER_JWKS_URL"
    prod = load_settings({"DROPSERVER_JWT_SECRET": "s3cret", "STRIPE_API_KEY": "sk_x",
                          "STRIPE_WEBHOOK_SECRET": "whsec_x"})
    assert prod.effective_jwt_secret == "s3cret"


def test_cross_field_checks():
    with pytest.raises(SettingsError, match="DROPSERVER_RECONNECT_MIN_MS"):
        load_settings({"DROPSERVER_DEV": "1", "DROPSERVER_RECONNECT_MIN_MS": "9000",
                       "DROPSERVER_RECONNECT_MAX_MS": "10"})
    with pytest.raises(SettingsError, match="STRIPE_API_KEY"):
        load_settings({"DROPSERVER_DEV": "1", "DROPSERVER_PAYMENT_GATEWAY": "stripe"})


def test_every_setting_is_documented():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [var for var, _default, _text in describe() if f"`{var}`" not in doc]
    assert missing == []
