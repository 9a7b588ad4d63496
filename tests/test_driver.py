"""Which Ray the driver uses: the one it is told of, else a Ray of its own (never one that happens to be running)."""

from types import SimpleNamespace

import pytest

from tuner import driver


@pytest.fixture
def ray_init(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(dashboard_url=None)

    monkeypatch.setattr(driver.ray, "init", init)
    return calls


def test_without_an_address_the_driver_starts_its_own_ray(ray_init, monkeypatch, capsys):
    # ray.init() with no address would join the last cluster `ray start` left on the machine; "local" never does.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    driver._start_ray(None)
    (call,) = ray_init
    assert call["address"] == "local" and call["dashboard_host"] == "127.0.0.1"
    assert "runtime_env" not in call  # a local Ray runs this checkout already


@pytest.mark.parametrize("given, env", [("10.0.0.5:6379", None), (None, "10.0.0.6:6379")])
def test_an_address_given_or_in_the_environment_is_joined_with_this_checkouts_code(ray_init, monkeypatch, given, env):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    driver._start_ray(given)
    (call,) = ray_init
    assert call["address"] == (given or env)
    assert [m.__name__ for m in call["runtime_env"]["py_modules"]] == ["trials", "tuner"]
