"""Self-describing safetensors checkpoints and strict weight loading."""

import numpy as np
import pytest

from weights.checkpoint import (WeightsError, check_state_dict, load_checkpoint, load_weights, module_arrays,
                                read_checkpoint, save_checkpoint)

LINEAR = {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
DIFFUSION = {"schedule": LINEAR, "space": "latent", "latent_scale": 2.5}


def test_round_trip_keeps_arrays_dtypes_and_config(tmp_path):
    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b.count": np.array([7], dtype=np.int64),
              "c.half": np.ones((2,), dtype=np.float16)}
    config = {"network": {"channels": 8, "channel_mult": [1, 2], "name": "tiny"}, "diffusion": DIFFUSION}
    save_checkpoint(tmp_path / "m.safetensors", arrays, kind="unet", config=config, extra={"step": 3})
    loaded, info = read_checkpoint(tmp_path / "m.safetensors")
    assert info == {"kind": "unet", "version": 2, "config": config, "extra": {"step": 3}}
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
    with pytest.raises(WeightsError, match="without this project's metadata.*convert_weights"):
        read_checkpoint(tmp_path / "plain.safetensors")
    # A PyTorch or Jittor file given where a checkpoint is expected points at the converter.
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(WeightsError, match=r"model.pt: .*PyTorch \(zip\) file: convert it first with "
                                           r"`python -m tools.convert_weights"):
        read_checkpoint(tmp_path / "model.pt")
    (tmp_path / "model.pkl").write_bytes(b"\x80\x04" + bytes(60))
    with pytest.raises(WeightsError, match=r"model.pkl: .*pickle.*convert_weights"):
        read_checkpoint(tmp_path / "model.pkl")


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
    from weights.checkpoint import weights_of

    plain = {"a": np.zeros(2)}
    assert weights_of(plain, {"kind": "unet"}) == (plain, "unet")
    train = {"model/a": np.zeros(2), "ema/a": np.ones(2), "optim/m.a": np.zeros(2)}
    ema, kind = weights_of(train, {"kind": "unet-train"})
    assert kind == "unet" and list(ema) == ["a"] and ema["a"][0] == 1
    raw, _ = weights_of(train, {"kind": "unet-train"}, which="model")
    assert raw["a"][0] == 0
    with pytest.raises(WeightsError, match="no 'ema' weights"):
        weights_of({"model/a": np.zeros(2)}, {"kind": "unet-train"})


# ----------------------------------------------------------------------------- schema
def write_v1(path, kind, config, arrays=None):
    """A file as version 1 of the format wrote it (flat or nested config, version "1")."""
    import json

    from safetensors.numpy import save_file

    metadata = {"format": "iidm-jittor", "version": "1", "kind": kind, "config": json.dumps(config),
                "extra": json.dumps({"step": 7})}
    save_file(arrays or {"w": np.zeros(2, np.float32)}, str(path), metadata=metadata)
    return path


def test_unet_checkpoints_must_carry_their_diffusion_settings(tmp_path):
    arrays = {"w": np.zeros(2, np.float32)}
    with pytest.raises(WeightsError, match="does not record its diffusion settings.*--latent_scale"):
        save_checkpoint(tmp_path / "u.safetensors", arrays, "unet", {"network": {"a": 1}})
    bad = {**DIFFUSION, "latent_scale": float("nan")}
    with pytest.raises(WeightsError, match="latent_scale must be a finite number"):
        save_checkpoint(tmp_path / "u.safetensors", arrays, "unet", {"network": {"a": 1}, "diffusion": bad})
    with pytest.raises(WeightsError, match="lacks \\['beta_end'\\]"):
        schedule = {k: v for k, v in LINEAR.items() if k != "beta_end"}
        save_checkpoint(tmp_path / "u.safetensors", arrays, "unet",
                        {"network": {"a": 1}, "diffusion": {**DIFFUSION, "schedule": schedule}})
    with pytest.raises(WeightsError, match="needs a 'network' section"):
        save_checkpoint(tmp_path / "u.safetensors", arrays, "vqmodel", {"ch": 8})
    assert not (tmp_path / "u.safetensors").exists()
    pixel = {"schedule": LINEAR, "space": "pixel"}
    save_checkpoint(tmp_path / "p.safetensors", arrays, "unet", {"network": {"a": 1}, "diffusion": pixel})
    assert load_checkpoint(tmp_path / "p.safetensors", "unet").diffusion == pixel


def test_version_1_layouts_are_migrated_on_read(tmp_path):
    # the export of a training run: {"unet", "schedule", "latent_scale"}
    export = write_v1(tmp_path / "export.safetensors", "unet",
                      {"unet": {"model_channels": 16}, "schedule": LINEAR, "latent_scale": 2.19})
    checkpoint = load_checkpoint(export, "unet")
    assert checkpoint.version == 1 and checkpoint.network == {"model_channels": 16}
    assert checkpoint.diffusion == {"schedule": LINEAR, "space": "latent", "latent_scale": 2.19}
    assert checkpoint.step == 7
    # a training run: {"unet", "train": {..., "schedule", "latent_scale"}, ...}
    run = write_v1(tmp_path / "run.safetensors", "unet-train",
                   {"unet": {"model_channels": 16}, "train": {"schedule": LINEAR, "latent_scale": 0.5, "lr": 1e-4},
                    "latents": "store"}, {"model/w": np.zeros(2, np.float32), "ema/w": np.ones(2, np.float32)})
    checkpoint = load_checkpoint(run, "unet")
    assert checkpoint.training and checkpoint.diffusion["latent_scale"] == 0.5
    assert checkpoint.config["latents"] == "store" and checkpoint.config["train"]["lr"] == 1e-4
    np.testing.assert_array_equal(checkpoint.weights("ema")["w"], np.ones(2))
    # a converted U-Net (flat): its schedule and latent scale were never recorded
    flat = write_v1(tmp_path / "flat.safetensors", "unet", {"model_channels": 16})
    checkpoint = load_checkpoint(flat, "unet")
    assert checkpoint.network == {"model_channels": 16}
    with pytest.raises(WeightsError, match="flat.safetensors: the checkpoint does not record its diffusion "
                                           "settings.*convert_weights.*--schedule linear:1000 --latent_scale"):
        checkpoint.diffusion
    # an autoencoder: flat config
    vq = write_v1(tmp_path / "vq.safetensors", "vqmodel", {"ch": 8})
    assert load_checkpoint(vq, "vqmodel").network == {"ch": 8}
    with pytest.raises(WeightsError, match="a 'vqmodel' checkpoint, expected 'unet'"):
        load_checkpoint(vq, "unet")


def test_a_network_config_needs_every_field(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Net:
        width: int = 8
        norm_groups: int = 32

    save_checkpoint(tmp_path / "n.safetensors", {"w": np.zeros(1, np.float32)}, "net", {"network": {"width": 4}})
    checkpoint = load_checkpoint(tmp_path / "n.safetensors")
    with pytest.raises(WeightsError, match="n.safetensors: the Net lacks the field\\(s\\) norm_groups.*"
                                           "convert_weights --config"):
        checkpoint.network_config(Net)
    save_checkpoint(tmp_path / "n.safetensors", {"w": np.zeros(1, np.float32)}, "net",
                    {"network": {"width": 4, "norm_groups": 8, "heads": 2}})
    with pytest.raises(WeightsError, match="unknown field\\(s\\) heads"):
        load_checkpoint(tmp_path / "n.safetensors").network_config(Net)


def test_streamed_file_is_standard_safetensors(tmp_path, jt):
    from safetensors import safe_open

    arrays = {"z.empty": np.zeros((0, 3), np.float32), "a.int": np.arange(5, dtype=np.int32),
              "m.bool": np.array([True, False]), "b.var": jt.array(np.full((3, 2), 1.5, np.float32)),
              "c.f64": np.linspace(0, 1, 7), "d.half": np.ones(3, np.float16), "e.t": np.arange(6.0).reshape(2, 3).T}
    save_checkpoint(tmp_path / "s.safetensors", arrays, "net", {"network": {}})
    with safe_open(str(tmp_path / "s.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == sorted(arrays)
        for name, value in arrays.items():
            expected = value.numpy() if hasattr(value, "sync") else value
            got = f.get_tensor(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
    import struct
    raw = (tmp_path / "s.safetensors").read_bytes()
    header_size = struct.unpack("<Q", raw[:8])[0]
    assert header_size % 8 == 0 and raw[8 + header_size - 1:8 + header_size] in (b" ", b"}")


SAVE_PEAK_SCRIPT = """
import sys
import numpy as np
from weights.checkpoint import save_checkpoint

def peak_mib():   # VmHWM: this process's own peak (a child's ru_maxrss starts at its parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0

arrays = {f"w{i}": np.full((64, 1024, 1024), i, np.float32) for i in range(4)}   # 4 x 256 MiB
before = peak_mib()
save_checkpoint(sys.argv[1], arrays, "net", {"network": {}})
print(peak_mib() - before)
"""


def test_saving_adds_little_to_peak_memory(tmp_path):
    """Saving ~1 GiB of arrays grows the peak by well under one array (256 MiB): nothing is
    copied whole (a bytes object of the file would add 1 GiB)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "big.safetensors"
    done = subprocess.run([sys.executable, "-c", SAVE_PEAK_SCRIPT, str(out)], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    growth_mib = float(done.stdout.strip().splitlines()[-1])
    assert growth_mib < 64, f"saving grew the peak by {growth_mib:.0f} MiB"
    import struct
    with open(out, "rb") as f:
        header_size = struct.unpack("<Q", f.read(8))[0]
    assert out.stat().st_size == 8 + header_size + 4 * 256 * 1024 * 1024
    from safetensors import safe_open
    with safe_open(str(out), framework="np") as f:
        assert f.get_tensor("w3")[63, 1023, 1023] == 3


def test_an_older_file_lacking_a_field_is_re_exported_as_its_message_says(jt, tmp_path, capsys):
    """A version-1 U-Net export whose config predates a field: loading it names the field and the
    converter's --preset / --config; running that conversion fills the field in, and the result
    loads with the file's own diffusion settings."""
    from models import UNetModel, unet_preset
    from models.unet import load_unet
    from tools.convert_weights import main as convert

    config = unet_preset("tiny").to_dict()
    old = write_v1(tmp_path / "old.safetensors", "unet",
                   {"unet": {k: v for k, v in config.items() if k != "use_fp16"}, "schedule": LINEAR,
                    "latent_scale": 2.19}, module_arrays(UNetModel(unet_preset("tiny"))))
    with pytest.raises(WeightsError, match="lacks the field.* use_fp16.*--config FILE.*--preset NAME"):
        load_unet(old)
    assert convert([str(old), str(tmp_path / "new.safetensors"), "--kind", "unet", "--preset", "tiny"]) == 0
    checkpoint = load_checkpoint(tmp_path / "new.safetensors", "unet")
    assert checkpoint.network == config and checkpoint.diffusion["latent_scale"] == 2.19


def test_an_older_run_without_its_latent_scale_names_it_and_takes_it_from_export(tmp_path, capsys):
    """A version-1 training run recorded its schedule but (before checkpoints carried it) not its
    latent scale: reading it gives no latent scale of 1 by default; its diffusion settings name the
    missing field and the export option that supplies it, and that export writes a loadable file."""
    from tools.export_weights import main as export

    run = write_v1(tmp_path / "run.safetensors", "unet-train",
                   {"unet": {"model_channels": 16}, "train": {"schedule": LINEAR, "lr": 1e-4}, "latents": "store"},
                   {"model/w": np.zeros(2, np.float32), "ema/w": np.ones(2, np.float32)})
    checkpoint = load_checkpoint(run, "unet")
    assert checkpoint.config["diffusion"] == {"schedule": LINEAR, "space": "latent"}
    with pytest.raises(WeightsError, match=r"run.safetensors: the checkpoint lacks diffusion.latent_scale.*"
                                           r"`python -m tools.export_weights .*run.safetensors OUT.safetensors "
                                           r"--schedule linear:1000 --latent_scale S`"):
        checkpoint.diffusion
    assert export([str(run), str(tmp_path / "plain.safetensors")]) == 1   # no scale, no file
    assert "lacks diffusion.latent_scale" in capsys.readouterr().err
    assert export([str(run), str(tmp_path / "out.safetensors"), "--latent_scale", "2.19"]) == 0
    exported = load_checkpoint(tmp_path / "out.safetensors", "unet")
    assert exported.diffusion == {"schedule": LINEAR, "space": "latent", "latent_scale": 2.19}
    np.testing.assert_array_equal(exported.weights()["w"], np.ones(2))
    # an option never overrides what a run records
    recorded = write_v1(tmp_path / "recorded.safetensors", "unet-train",
                        {"unet": {"model_channels": 16}, "train": {"schedule": LINEAR, "latent_scale": 0.5}},
                        {"model/w": np.zeros(2, np.float32), "ema/w": np.ones(2, np.float32)})
    assert export([str(recorded), str(tmp_path / "x.safetensors"), "--latent_scale", "2.19"]) == 1
    assert "records latent_scale 0.5" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_an_older_export_without_its_latent_scale_is_converted_with_the_named_option(jt, tmp_path, capsys):
    """A version-1 U-Net export with a schedule but no latent scale: loading names the field and
    convert_weights' --latent_scale; converting without it is refused, with it the file loads."""
    from models import UNetModel, unet_preset
    from models.unet import load_unet
    from tools.convert_weights import main as convert

    config = unet_preset("tiny").to_dict()
    old = write_v1(tmp_path / "old.safetensors", "unet", {"unet": config, "schedule": LINEAR},
                   module_arrays(UNetModel(unet_preset("tiny"))))
    with pytest.raises(WeightsError, match=r"old.safetensors: the checkpoint lacks diffusion.latent_scale.*"
                                           r"convert_weights .*old.safetensors OUT.safetensors --kind unet"):
        load_unet(old)[1].diffusion
    assert convert([str(old), str(tmp_path / "new.safetensors"), "--kind", "unet"]) == 1
    assert "give --latent_scale" in capsys.readouterr().err
    assert convert([str(old), str(tmp_path / "new.safetensors"), "--kind", "unet", "--latent_scale", "2.19"]) == 0
    assert load_checkpoint(tmp_path / "new.safetensors", "unet").diffusion == {
        "schedule": LINEAR, "space": "latent", "latent_scale": 2.19}
