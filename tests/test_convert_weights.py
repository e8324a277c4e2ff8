"""The weight converter (``python -m tools.convert_weights``) on the upstream layouts: configs
translated as upstream code builds its networks, conversions refused where shapes cannot reveal
a difference, the kind told by the names, memory bounded by one array.

The upstream facts below are transcribed from the upstream repositories (file named at each), not
produced by the code under test; the PyTorch files are written by test_foreign_weights' helpers.
"""

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from test_foreign_weights import (STORAGE_REFS, FakeTensor, TorchLikePickler, taming_state, taming_vq_shapes, tensors_of,
                                  write_lightning, write_torch_zip)
from weights.checkpoint import WeightsError, read_checkpoint
from weights.upstream import (UpstreamConfigError, attention_heads, disagreements, parse_flags, read_config,
                              sdm_config)

REPO = Path(__file__).resolve().parents[1]

# semantic-diffusion-model/scripts/ade20k.sh, the model flags of its test command.
SDM_ADE20K_FLAGS = ("--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True "
                    "--noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
                    "--resblock_updown True --use_fp16 True --use_scale_shift_norm True --num_classes 151 "
                    "--class_cond True --no_instance True")
# jittor-jieke-semantic_images_synthesis/image_sample.py, create_argparser (the model part; IIDM's
# image_size is the latent's (width, height)).
IIDM_SAMPLE_ARGUMENTS = {
    "attention_resolutions": "32, 16, 8", "diffusion_steps": 1000, "learn_sigma": True, "noise_schedule": "linear",
    "num_channels": 256, "num_head_channels": 64, "num_res_blocks": 2, "resblock_updown": True,
    "use_scale_shift_norm": True, "use_fp16": False, "num_classes": 29, "class_cond": True,
    "no_instance": True, "image_size": [128, 96], "model_path": "checkpoints/average-176k-266k.pkl",
    "ae_config": "config/config-jittor.yaml", "use_ddim": True, "s": 1.0,
}
# latent-diffusion/models/first_stage_models/vq-f4/config.yaml (model section)
LDM_VQ_F4 = """
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 3
    n_embed: 8192
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 3
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult: [1, 2, 4]
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params: {disc_start: 0, disc_weight: 0.75, codebook_weight: 1.0}
"""
# latent-diffusion/models/ldm/semantic_synthesis256/config.yaml (abridged: the U-Net and the
# autoencoder)
LDM_SEMANTIC_256 = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.0015
    timesteps: 1000
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params: {image_size: 64, in_channels: 6, out_channels: 3, model_channels: 128}
    first_stage_config:
      target: ldm.models.autoencoder.VQModelInterface
      params:
        embed_dim: 3
        n_embed: 8192
        ddconfig:
          double_z: false
          z_channels: 3
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""
# An SDM model with the widths of this project's demo preset (SDM's code, so 32 groups, SPADE 128).
SDM_DEMO_SIZE_FLAGS = ("--image_size 64 --num_channels 32 --channel_mult 1,2,2 --num_res_blocks 1 "
                       "--attention_resolutions 16 --num_head_channels 32 --num_classes 29 --no_instance True "
                       "--class_cond True --learn_sigma True --resblock_updown True --use_scale_shift_norm True "
                       "--diffusion_steps 1000 --noise_schedule linear")


def write(path, text):
    path.write_text(text)
    return str(path)


def random_state(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def unet_shapes(network):
    """Name -> shape of this project's U-Net for a network config dict (no value is computed)."""
    from models import UNetConfig, UNetModel
    from weights.checkpoint import module_shapes

    return module_shapes(UNetModel(UNetConfig.from_dict(network)))


def write_state(path, state):
    tensors, storages = tensors_of(state)
    write_torch_zip(path, tensors, storages)
    return str(path)


# ------------------------------------------------------------------------------ translation
def test_sdm_flags_translate_as_sdm_create_model_builds_them(tmp_path):
    config = read_config(write(tmp_path / "ade20k.flags", SDM_ADE20K_FLAGS))
    assert config.kind == "unet" and config.origin == "SDM flags" and config.upstream
    assert config.network == {
        "in_channels": 3, "model_channels": 256, "num_res_blocks": 2,
        "attention_resolutions": [8, 16, 32],            # 256 // 32, 256 // 16, 256 // 8
        "dropout": 0.0, "channel_mult": [1, 1, 2, 2, 4, 4],   # create_model's choice for image_size 256
        "conv_resample": True, "num_classes": 151,       # no_instance: no edge channel
        "num_heads": 4, "num_head_channels": 64, "num_heads_upsample": -1,
        "use_scale_shift_norm": True, "resblock_updown": True, "learn_sigma": True,
        "norm_groups": 32, "spade_hidden_channels": 128, "use_fp16": False}
    assert config.diffusion == {"schedule": {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                             "beta_end": 0.02}, "space": "pixel"}
    assert any("use_fp16" in note for note in config.notes)

    # The same as JSON; the whole pasted test command (script flags left out and reported).
    arguments = parse_flags(SDM_ADE20K_FLAGS)
    assert read_config(write(tmp_path / "ade20k.json", json.dumps(arguments))).network == config.network
    script = ("mpiexec -n 8 python image_sample.py --data_dir ./data/ade20k --dataset_mode ade20k \\\n  "
              + SDM_ADE20K_FLAGS + " --batch_size 2 --num_samples 2000 \\\n  --model_path OUT/ema_0.9999_best.pt --s 1.5")
    pasted = read_config(write(tmp_path / "sample.sh", script))
    assert pasted.network == config.network
    assert "batch_size, data_dir, dataset_mode, model_path, num_samples, s" in pasted.notes[0]

    # The instance edge map adds a mask channel; defaults are model_and_diffusion_defaults().
    celeba = sdm_config({**arguments, "num_classes": "19", "no_instance": "False", "num_head_channels": "-1"})
    assert celeba.network["num_classes"] == 20 and celeba.network["num_heads"] == 4
    assert sdm_config({"class_cond": True}).network["channel_mult"] == [1, 2, 3, 4]   # image_size 64


@pytest.mark.parametrize("change, message", [
    ({"num_head_channel": "64"}, "unknown SDM/IIDM option\\(s\\) num_head_channel"),
    ({"class_cond": "False"}, "class_cond is False"),
    ({"use_new_attention_order": "True"}, "use_new_attention_order is True.*legacy order"),
    ({"predict_xstart": "True"}, "predict_xstart"),
    ({"image_size": "96", "channel_mult": ""}, "unsupported image size: 96"),
    ({"learn_sigma": "maybe"}, "learn_sigma must be a boolean"),
])
def test_sdm_arguments_that_cannot_describe_this_network_are_refused(change, message):
    with pytest.raises(UpstreamConfigError, match=message):
        sdm_config({**parse_flags(SDM_ADE20K_FLAGS), **change})


def test_iidm_arguments_give_the_iidm_preset_and_its_diffusion(tmp_path):
    from models.unet import PRESET_DIFFUSION, unet_preset

    config = read_config(write(tmp_path / "iidm.json", json.dumps(IIDM_SAMPLE_ARGUMENTS)))
    assert config.origin == "IIDM arguments (JSON)"
    network = config.network
    assert network["attention_resolutions"] == [4, 8, 16]       # width 128 // (32, 16, 8)
    assert network["channel_mult"] == [1, 1, 2, 3, 4] and network["num_classes"] == 29
    assert disagreements("unet", network, unet_preset("iidm").to_dict()) == []
    assert config.diffusion == {"schedule": {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                             "beta_end": 0.02}, "space": "latent", "latent_scale": 1.0}
    assert config.diffusion == PRESET_DIFFUSION["iidm"]


def test_ldm_yaml_first_stage_and_whole_model_give_vq_f4(tmp_path):
    from autoencoder.vqmodel import vq_config

    first_stage = read_config(write(tmp_path / "vq-f4.yaml", LDM_VQ_F4))
    whole = read_config(write(tmp_path / "semantic.yaml", LDM_SEMANTIC_256))
    assert first_stage.kind == whole.kind == "vqmodel"
    assert "first_stage_config" in whole.origin
    assert first_stage.network == whole.network == vq_config("vq-f4").to_dict()
    with pytest.raises(UpstreamConfigError, match="attn_type='none'"):
        read_config(write(tmp_path / "noattn.yaml", LDM_VQ_F4.replace("double_z", "attn_type: none\n      double_z")))
    kl = LDM_VQ_F4.replace("ldm.models.autoencoder.VQModel", "ldm.models.autoencoder.AutoencoderKL")
    with pytest.raises(UpstreamConfigError, match="KL autoencoder"):
        read_config(write(tmp_path / "kl.yaml", kl))
    with pytest.raises(UpstreamConfigError, match="lacks n_embed"):
        read_config(write(tmp_path / "partial.yaml", LDM_VQ_F4.replace("n_embed: 8192", "")))


def test_head_layouts_compare_by_the_heads_they_build():
    from models.unet import unet_preset

    iidm = unet_preset("iidm").to_dict()     # 64 channels per head at widths 256, 512, 768, 1024
    assert disagreements("unet", iidm, {**iidm, "num_heads": 1, "num_heads_upsample": 7}) == []
    by_count = {**iidm, "num_head_channels": -1, "num_heads": 4}
    assert [d.split(":")[0] for d in disagreements("unet", iidm, by_count)] == ["attention heads"]
    assert ("middle", 4, 16) in attention_heads(iidm) and ("middle", 4, 4) in attention_heads(by_count)


# ------------------------------------------------------------------------------ conversion
def test_demo_unet_to_float16_keeps_its_diffusion_settings(jt, tmp_path):
    """The demo's latent scale (2.19, recorded by its version-1 file) survives a dtype conversion."""
    from tools.convert_weights import main

    source = REPO / "checkpoints" / "demo" / "unet.safetensors"
    with open(source, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    recorded = json.loads(header["__metadata__"]["config"])
    assert main(["--kind", "unet", str(source), str(tmp_path / "half.safetensors"), "--dtype", "float16"]) == 0
    arrays, info = read_checkpoint(tmp_path / "half.safetensors")
    diffusion = info["config"]["diffusion"]
    assert diffusion["latent_scale"] == recorded["latent_scale"] and round(diffusion["latent_scale"], 2) == 2.19
    assert diffusion["schedule"] == recorded["schedule"] and diffusion["space"] == "latent"
    original, _ = read_checkpoint(source)
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float16)}
    np.testing.assert_array_equal(arrays["out.2.weight"], original["out.2.weight"].astype(np.float16))


def test_an_sdm_model_of_demo_size_converts_with_its_config_not_the_demo_preset(jt, tmp_path, capsys):
    from tools.convert_weights import main

    flags = write(tmp_path / "sdm.flags", SDM_DEMO_SIZE_FLAGS)
    network = read_config(flags).network
    state = random_state(unet_shapes(network))
    assert state["middle_block.0.in_norm.mlp_shared.0.weight"].shape == (128, 29, 3, 3)   # SPADE's 128
    source = write_state(tmp_path / "ema_0.9999_best.pt", state)
    out = tmp_path / "sdm.safetensors"

    assert main(["--kind", "unet", "--preset", "demo", source, str(out)]) == 1
    err = capsys.readouterr().err
    assert "preset demo is this project's own U-Net (norm_groups=8 (upstream code: 32), " \
           "spade_hidden_channels=32 (upstream code: 128))" in err and "--config FILE" in err
    assert not out.exists()

    assert main([source, str(out), "--config", flags]) == 0
    assert "a unet (from --config); architecture from --config" in capsys.readouterr().out
    arrays, info = read_checkpoint(out)
    assert info["config"]["network"] == {**network, "channel_mult": [1, 2, 2]}
    assert info["config"]["network"]["norm_groups"] == 32 and info["config"]["network"]["spade_hidden_channels"] == 128
    assert info["config"]["diffusion"]["space"] == "pixel" and "latent_scale" not in info["config"]["diffusion"]
    for name, value in state.items():
        np.testing.assert_array_equal(arrays[name], value)

    # This project's JSON layout must state every field (norm_groups above all).
    partial = {k: v for k, v in network.items() if k != "norm_groups"}
    assert main([source, str(out), "--config", write(tmp_path / "partial.json", json.dumps({"network": partial}))]) == 1
    assert "lacks the field(s) norm_groups" in capsys.readouterr().err

    # --latent_scale makes no sense for a pixel model; --preset and --config must agree.
    assert main([source, str(out), "--config", flags, "--latent_scale", "0.18"]) == 1
    assert "this U-Net diffuses pixels" in capsys.readouterr().err
    assert main([source, str(out), "--config", flags, "--preset", "iidm"]) == 1
    err = capsys.readouterr().err
    assert "--preset iidm and --config" in err and "describe different networks" in err and "model_channels: 256 vs 32" in err


# An SDM model with two heads at every attention width (num_head_channels -1): the same weight
# shapes as 32 channels per head, which splits its 64- and 128-channel attention into 2 and 4 heads.
SDM_TWO_HEADS_FLAGS = ("--image_size 64 --num_channels 64 --channel_mult 1,2 --num_res_blocks 1 "
                       "--attention_resolutions 32 --num_heads 2 --num_head_channels -1 --num_classes 29 "
                       "--no_instance True --class_cond True --learn_sigma True --resblock_updown True "
                       "--use_scale_shift_norm True --diffusion_steps 1000 --noise_schedule linear")


def test_a_foreign_unet_is_refused_without_config_since_its_heads_leave_no_trace(jt, tmp_path, capsys,
                                                                                monkeypatch):
    """Neither SDM's .pt nor IIDM's .pkl records its model arguments, and the head layout does not
    show in the shapes: a U-Net from either, described by a preset alone (or by nothing), is
    refused with a request for --config, even by a preset that keeps what upstream code fixes;
    the file's own arguments convert it, heads as trained."""
    from argparse import Namespace

    import models.unet as unet_module
    from tools.convert_weights import main
    from weights.convert import Refusal, choose_network

    for name in ("iidm", "sdm-ade20k"):
        with pytest.raises(Refusal, match=f"preset {name} .*num_heads, num_head_channels, num_heads_upsample.*"
                                          "--config FILE"):
            choose_network("unet", Namespace(preset=name, config=None, input="model.pt"), None, None)

    flags = write(tmp_path / "sdm.flags", SDM_TWO_HEADS_FLAGS)
    trained = read_config(flags).network
    guess = {**trained, "num_heads": 4, "num_head_channels": 32}     # 32 groups, SPADE 128: upstream's
    monkeypatch.setitem(unet_module.UNET_PRESETS, "upstream-size", guess)
    assert unet_shapes(guess) == unet_shapes(trained)
    assert [d.split(":")[0] for d in disagreements("unet", trained, guess)] == ["attention heads"]
    source = write_state(tmp_path / "ema_0.9999_best.pt", random_state(unet_shapes(trained)))
    out = tmp_path / "sdm.safetensors"
    for options in (["--preset", "upstream-size"], []):
        assert main([source, str(out), "--kind", "unet", "--space", "pixel", "--schedule", "linear:1000",
                     *options]) == 1
        err = capsys.readouterr().err
        assert "do not show how its attention channels are split into heads" in err
        assert "--config FILE" in err and not out.exists()

    assert main([source, str(out), "--config", flags]) == 0
    assert read_checkpoint(out)[1]["config"]["network"]["num_head_channels"] == -1
    assert main([source, str(out), "--config", flags, "--preset", "upstream-size"]) == 1
    assert "describe different networks: attention heads" in capsys.readouterr().err


def test_the_iidm_flags_written_out_in_the_docs_build_the_iidm_preset(tmp_path):
    """docs/converting.md gives IIDM's image_sample.py arguments as the --config its published U-Net
    needs; they must build exactly the iidm preset, with its diffusion settings."""
    from models.unet import PRESET_DIFFUSION, unet_preset

    text = (REPO / "docs" / "converting.md").read_text()
    block = text.split("as a flag file (`configs/iidm.flags`):", 1)[1].split("\n\n")[1]
    shipped = REPO / "configs" / "iidm.flags"
    flags = [line for line in shipped.read_text().splitlines() if not line.startswith("#")]
    assert " ".join(block.split()) == " ".join(" ".join(flags).split())     # the docs show the shipped file
    for path in (write(tmp_path / "iidm.flags", block), shipped):
        config = read_config(path)
        assert config.origin == "IIDM flags" and config.notes == []
        assert disagreements("unet", config.network, unet_preset("iidm").to_dict()) == []
        assert config.diffusion == PRESET_DIFFUSION["iidm"]


def test_small_vq_preset_cannot_describe_a_taming_file(jt, tmp_path, capsys):
    """The small preset's 8 norm groups give the same shapes as taming's 32: only the config can tell."""
    from tools.convert_weights import main

    layout = dict(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(), resolution=256, z_channels=3,
                  embed_dim=3, n_embed=1024)
    state = random_state(taming_vq_shapes(**layout))
    write_lightning(tmp_path / "last.ckpt", state)
    out = tmp_path / "vq.safetensors"
    assert main([str(tmp_path / "last.ckpt"), str(out), "--preset", "small"]) == 1
    assert "preset small is this project's own autoencoder (num_groups=8 (upstream code: 32))" in capsys.readouterr().err
    assert not out.exists()

    yaml = LDM_VQ_F4.replace("ch: 128", "ch: 32").replace("num_res_blocks: 2", "num_res_blocks: 1") \
                    .replace("n_embed: 8192", "n_embed: 1024")
    assert main([str(tmp_path / "last.ckpt"), str(out), "--config", write(tmp_path / "vq.yaml", yaml)]) == 0
    arrays, info = read_checkpoint(out)
    assert info["kind"] == "vqmodel" and info["config"]["network"]["num_groups"] == 32
    assert info["config"]["network"]["ch"] == 32 and info["config"]["network"]["n_embed"] == 1024
    np.testing.assert_array_equal(arrays["quantize.embedding.weight"], state["quantize.embedding.weight"])


def test_own_checkpoint_keeps_its_config_and_refuses_a_contradicting_preset(jt, tmp_path, capsys):
    from tools.convert_weights import main

    source = str(REPO / "checkpoints" / "demo" / "unet.safetensors")
    assert main([source, str(tmp_path / "x.safetensors"), "--preset", "iidm"]) == 1
    err = capsys.readouterr().err
    assert "the input's own config and --preset iidm describe different networks" in err
    assert main([source, str(tmp_path / "x.safetensors"), "--preset", "demo"]) == 0


def test_the_kind_is_told_by_the_names_and_a_contradicting_kind_is_named(jt, tmp_path, capsys):
    from tools.convert_weights import main
    from weights.convert import KINDS, Refusal, resolve_kind

    unet = ["module.input_blocks.0.0.weight", "module.out.2.weight"]
    vq = ["first_stage_model.encoder.conv_in.weight", "first_stage_model.decoder.conv_out.weight"]
    assert resolve_kind(unet, None, None, None) == ("unet", "told by its names (input_blocks.0.0.weight under 'module.')")
    assert resolve_kind(vq, None, None, None)[0] == "vqmodel"
    with pytest.raises(Refusal, match="more than one network.*choose one with --kind"):
        resolve_kind(vq + ["model.diffusion_model.input_blocks.0.0.weight"], None, None, None)
    with pytest.raises(Refusal, match="cannot tell which network.*give --kind"):
        resolve_kind(["w"], None, None, None)
    assert set(KINDS) == {"unet", "vqmodel"}

    network = read_config(write(tmp_path / "sdm.flags", SDM_DEMO_SIZE_FLAGS)).network
    source = write_state(tmp_path / "model.pt", random_state(unet_shapes(network)))
    assert main(["--kind", "vqmodel", source, str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "--kind says vqmodel, but the names look like a U-Net (input_blocks.0.0.weight, no " \
           "encoder.conv_in.weight): use --kind unet" in err
    assert main(["--kind", "vqmodel", "--config", str(tmp_path / "sdm.flags"), source, "o.safetensors"]) == 1
    assert "--kind says vqmodel, --config says unet" in capsys.readouterr().err


# ------------------------------------------------------------------------------ memory
# The peak is the process's VmHWM: its ru_maxrss would start at the parent's peak (Linux keeps the
# larger of the two across exec), hiding the growth when the test process itself held the file.
PEAK_SCRIPT = """
import sys
import jittor_env
jittor_env.setup(force_cpu=True)
from tools.convert_weights import main
import autoencoder.vqmodel, models.unet

def peak_mib():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024.0

before = peak_mib()
code = main(sys.argv[1:] + ["--cpu"])
print("exit", code, "growth_mib", peak_mib() - before)
"""


def convert_in_subprocess(*args):
    """Run the converter in a fresh process: (exit code, growth of its peak RSS in MiB, stderr)."""
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[0] == "exit", done.stdout + done.stderr
    return int(last[1]), float(last[3]), done.stderr


@pytest.mark.parametrize("layout", ["torch-zip", "pickle"])
def test_converting_holds_about_one_array_at_a_time(tmp_path, layout):
    """LDM's vq-f4 (211 MiB; its largest array 9 MiB) converts to float16 with a peak RSS growth
    well below its size (reading everything first adds the whole file, twice over)."""
    import pickle

    shapes = taming_vq_shapes(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
                              z_channels=3, embed_dim=3, n_embed=8192)
    state = {name: np.full(shape, i, np.float32) for i, (name, shape) in enumerate(sorted(shapes.items()))}
    size_mib = sum(a.nbytes for a in state.values()) / 2 ** 20
    if layout == "torch-zip":
        source = write_state(tmp_path / "vq-f4.ckpt", state)
    else:
        source = tmp_path / "vq-f4.pkl"
        source.write_bytes(pickle.dumps(state, protocol=4))
    del state
    out = tmp_path / "vq-f4.safetensors"
    code, growth_mib, err = convert_in_subprocess(source, out, "--kind", "vqmodel", "--preset", "vq-f4",
                                                  "--dtype", "float16")
    assert code == 0, err
    assert growth_mib < 0.25 * size_mib, f"converting {size_mib:.0f} MiB grew the peak by {growth_mib:.0f} MiB"
    arrays, _ = read_checkpoint(out)
    name = "decoder.mid.block_1.conv1.weight"
    assert arrays[name].dtype == np.float16 and arrays[name].shape == shapes[name]
    np.testing.assert_array_equal(arrays[name], np.float16(sorted(shapes).index(name)))


def test_a_zip_member_inflating_past_its_storage_is_refused_uninflated(jt, tmp_path):
    """An autoencoder file whose codebook storage (64 x 3 floats) is a 0.25 MiB deflate member
    that inflates to 256 MiB: refused by file and member, nothing inflated."""
    from autoencoder.vqmodel import vq_config
    from weights.foreign import open_weights

    tensors, storages = tensors_of(taming_state())
    bomb = next(i for i, name in enumerate(tensors) if name == "quantize.embedding.weight")
    source = tmp_path / "bomb.pt"
    write_torch_zip(source, tensors, [s for i, s in enumerate(storages) if i != bomb])
    with zipfile.ZipFile(source, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open(f"archive/data/{storages[bomb].key}", "w", force_zip64=True) as member:
            block = bytes(1 << 20)
            for _ in range(256):
                member.write(block)
    assert source.stat().st_size < 1 << 20
    message = (f"bomb.pt: zip member archive/data/{bomb} inflates to 268435456 bytes but its tensors need 768; "
               "refused without inflating it")
    arrays, _ = open_weights(source)
    with pytest.raises(WeightsError, match=message):
        arrays["quantize.embedding.weight"].numpy()
    config = write(tmp_path / "tiny.json", json.dumps({"network": vq_config("tiny").to_dict()}))
    code, growth_mib, err = convert_in_subprocess(source, tmp_path / "out.safetensors", "--config", config)
    assert code == 1 and message in err
    assert growth_mib < 32, f"grew the peak by {growth_mib:.0f} MiB"
    assert not (tmp_path / "out.safetensors").exists()


class SizedStorage:
    """A float32 storage known by its key and element count; its bytes are written separately."""

    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class SizedPickler(TorchLikePickler):
    def persistent_id(self, obj):
        if isinstance(obj, SizedStorage):
            return ("storage", STORAGE_REFS["FloatStorage"], obj.key, "cpu", obj.numel)
        return super().persistent_id(obj)


def write_torch_zip_streamed(path, shapes, fill):
    """torch.save's zip layout for float32 tensors of ``shapes``, each storage's bytes made by
    ``fill(index, shape)`` while it is written (a real-size file without holding it in memory)."""
    tensors = {}
    for i, (name, shape) in enumerate(shapes.items()):
        strides = tuple(int(np.prod(shape[k + 1:])) for k in range(len(shape)))
        tensors[name] = FakeTensor(SizedStorage(str(i), int(np.prod(shape))), 0, shape, strides)
    buffer = io.BytesIO()
    SizedPickler(buffer, protocol=2).dump(tensors)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        for i, shape in enumerate(shapes.values()):
            with archive.open(f"archive/data/{i}", "w", force_zip64=True) as member:
                member.write(fill(i, shape).tobytes())
        archive.writestr("archive/version", "3\n")


@pytest.mark.slow
def test_real_size_iidm_unet_converts_within_one_and_a_half_outputs(tmp_path):
    """The iidm preset's U-Net (~2 GB of float32) as a PyTorch zip: peak RSS growth of the
    conversion at most 1.5x the output (printed for the record)."""
    from models.unet import unet_preset

    shapes = unet_shapes(unet_preset("iidm").to_dict())
    source = tmp_path / "iidm.pt"
    write_torch_zip_streamed(source, shapes, lambda i, shape: np.full(shape, i % 97, np.float32))
    out = tmp_path / "iidm.safetensors"
    arguments = write(tmp_path / "iidm.json", json.dumps(IIDM_SAMPLE_ARGUMENTS))
    for dtype in ("float32", "float16"):
        code, growth_mib, err = convert_in_subprocess(source, out, "--kind", "unet", "--config", arguments,
                                                      "--preset", "iidm", "--dtype", dtype)
        assert code == 0, err
        out_mib = out.stat().st_size / 2 ** 20
        print(f"iidm {dtype}: input {source.stat().st_size / 2 ** 20:.0f} MiB, output {out_mib:.0f} MiB, "
              f"peak RSS growth {growth_mib:.0f} MiB ({growth_mib / out_mib:.2f}x the output)")
        assert growth_mib <= 1.5 * out_mib


def test_a_huge_declared_storage_does_not_license_a_huge_member(tmp_path):
    """The pickle declares a 64 Mi-element storage under a 64 x 3 tensor, and the storage's deflate
    member inflates to 256 MiB: the member is measured against what the tensor reaches (768
    bytes), not the declared storage, so it is refused without being inflated."""
    from weights.foreign import open_weights

    buffer = io.BytesIO()
    SizedPickler(buffer, protocol=2).dump({"w": FakeTensor(SizedStorage("0", 64 << 20), 0, (64, 3), (3, 1))})
    source = tmp_path / "declared.pt"
    with zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
    with zipfile.ZipFile(source, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            for _ in range(256):
                member.write(bytes(1 << 20))
    assert source.stat().st_size < 1 << 20
    arrays, _ = open_weights(source)
    with pytest.raises(WeightsError, match="inflates to 268435456 bytes but its tensors need 768; refused"):
        arrays["w"].numpy()


def test_a_stored_member_is_read_only_as_far_as_its_tensors_reach(tmp_path):
    """A tensor on part of a larger (stored, uncompressed) storage reads its own elements right:
    the storage is read up to the furthest element, with an offset and a transposing stride."""
    from weights.foreign import open_weights

    values = np.arange(40, dtype=np.float32)
    buffer = io.BytesIO()
    SizedPickler(buffer, protocol=2).dump({"t": FakeTensor(SizedStorage("0", 40), 5, (3, 4), (1, 3))})
    source = tmp_path / "view.pt"
    with zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", values.tobytes())
    arrays, _ = open_weights(source)
    expected = np.lib.stride_tricks.as_strided(values[5:], shape=(3, 4), strides=(4, 12))
    np.testing.assert_array_equal(arrays["t"].numpy(), expected)
