"""io.save_safetensors with names that have no UTF-8 form (the session-16 fuzz sweep): a lone
surrogate in a tensor name or metadata (as os.listdir gives for a non-UTF-8 file name) reached the
binding and failed with pybind11's bare 'Unable to cast ... to C++ type' RuntimeError. Now a
ValueError names the field; nothing is written."""
from __future__ import annotations

import numpy as np
import pytest

from qlora_native import io as qio


@pytest.mark.parametrize("tensors,metadata,match", [
    ({"w\udc80": np.zeros(2, np.float32)}, None, r"tensor name 'w\\udc80' is not valid UTF-8"),
    ({"w": np.zeros(2, np.float32)}, {"k\udcff": "v"}, r"metadata key 'k\\udcff' is not valid UTF-8"),
    ({"w": np.zeros(2, np.float32)}, {"k": "v\ud800"}, r"metadata value of 'k' 'v\\ud800' is not valid UTF-8"),
])
def test_names_without_utf8_form_are_value_errors(tmp_path, tensors, metadata, match):
    p = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match=match):
        qio.save_safetensors(p, tensors, metadata=metadata)
    assert not p.exists() and list(tmp_path.iterdir()) == []


def test_non_ascii_names_still_round_trip(tmp_path):
    p = tmp_path / "t.safetensors"
    qio.save_safetensors(p, {"poids_é_🙂": np.arange(3, dtype=np.float32)}, metadata={"clé": "värde"})
    f = qio.safe_open(p)
    assert list(f.keys()) == ["poids_é_🙂"] and f.metadata() == {"clé": "värde"}
    np.testing.assert_array_equal(f["poids_é_🙂"], np.arange(3, dtype=np.float32))
