"""Self-describing safetensors checkpoints and strict weight loading."""

import numpy as np
import pytest

from ldm.checkpoint import (WeightsError, check_state_dict, load_weights, module_arrays,
                            read_checkpoint, save_checkpoint)


def test_round_trip_keeps_arrays_dtypes_and_config(tmp_path):
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b.count": np.array([7], dtype=np.int64),
              "c.half": np.ones((2,), dtype=np.float16)}
    config = {"channels": 8, "channel_mult": [1, 2], "name": "tiny"}
    save_checkpoint(tmp_path / "m.safetensors", arrays, kind="unet", config=config, extra={"step": 3})
    loaded, info = read_checkpoint(tmp_path / "m.safetensors")
    assert info == {"kind": "unet", "version": 1, "config": config, "extra": {"step": 3}}
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_unreadable_and_foreign_files(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        read_checkpoint(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable safetensors"):
        read_checkpoint(tmp_path / "junk.safetensors")
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="without this project's metadata"):
        read_checkpoint(tmp_path / "plain.safetensors")


def test_check_state_dict_reports_every_problem():
    expected = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "norm.weight": (4,)}
    state = {"conv.weight": np.zeros((4, 29, 3, 3)), "conv.bias": np.zeros(4), "extra.weight": np.zeros(1)}
    with pytest.raises(WeightsError) as err:
        check_state_dict(expected, state, source="model.pt")
    message = str(err.value)
    assert message.startswith("model.pt does not fit the network")
    assert "conv.weight: expected (4, 3, 3, 3), file has (4, 29, 3, 3)" in message
    assert "1 missing weight(s): norm.weight" in message
    assert "1 unexpected weight(s): extra.weight" in message
    check_state_dict(expected, {k: np.zeros(s) for k, s in expected.items()})


def test_load_weights_into_jittor_module(jt):
    conv = jt.nn.Conv2d(3, 4, 3)
    rng = np.random.default_rng(0)
    state = {"weight": rng.standard_normal((4, 3, 3, 3)), "bias": rng.standard_normal(4)}
    load_weights(conv, state)
    arrays = module_arrays(conv)
    assert arrays["weight"].dtype == np.float32
    np.testing.assert_allclose(arrays["weight"], state["weight"], rtol=1e-6)
    with pytest.raises(WeightsError, match="missing weight"):
        load_weights(conv, {"weight": state["weight"]})
    np.testing.assert_allclose(module_arrays(conv)["bias"], state["bias"], rtol=1e-6)


def test_weights_of_training_and_weights_checkpoints():
    from ldm.checkpoint import weights_of

    plain = {"a": np.zeros(2)}
    assert weights_of(plain, {"kind": "unet"}) == (plain, "unet")
    train = {"model/a": np.zeros(2), "ema/a": np.ones(2), "optim/m.a": np.zeros(2)}
    ema, kind = weights_of(train, {"kind": "unet-train"})
    assert kind == "unet" and list(ema) == ["a"] and ema["a"][0] == 1
    raw, _ = weights_of(train, {"kind": "unet-train"}, which="model")
    assert raw["a"][0] == 0
    with pytest.raises(WeightsError, match="no 'ema' weights"):
        weights_of({"model/a": np.zeros(2)}, {"kind": "unet-train"})
