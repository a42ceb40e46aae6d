from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Chime's own state (database, adapter registry) never goes to the user's home during tests.
os.environ["CHIME_HOME"] = tempfile.mkdtemp(prefix="chime-test-home-")
os.environ.pop("DATABASE_URL", None)

from tests.tiny import build_tiny_model  # noqa: E402

# Profiles for tests/test_fuzz.py only (chosen there by CHIME_FUZZ_PROFILE; never loaded globally, so the
# other hypothesis tests keep their own settings). "fuzz" is quick for a developer's run; CI's `make test`
# and `make fuzz` use "fuzz-slow": 10,000 examples per property, no deadline on a busy 2-core runner, and
# the blob that replays a failure with @reproduce_failure.
settings.register_profile("fuzz", max_examples=200, deadline=None)
settings.register_profile(
    "fuzz-slow",
    max_examples=10_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_format(tiny_tokenizer):
    from model.chat_format import ChatFormat

    return ChatFormat(tiny_tokenizer, max_message_chars=2000)


@pytest.fixture()
def tiny_engine_factory(tiny_model_dir: Path):
    """Build engines on the tiny model: `make(**config_overrides)`."""
    from model.config import EngineConfig
    from model.engine import Engine

    def make(**overrides):
        settings = {"model": str(tiny_model_dir), "dtype": "float32", "seed": 0, "temperature": 0.0}
        settings.update(overrides)
        return Engine.from_config(EngineConfig(**settings))

    return make


@pytest.fixture(scope="session")
def default_engine():
    """The real default model without an adapter, loaded once per session (converted and cached on first use)."""
    from model.config import EngineConfig
    from model.engine import Engine

    return Engine.from_config(EngineConfig(seed=0, temperature=0.0, adapter=None, threshold=0.5))
