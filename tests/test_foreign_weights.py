"""Reading PyTorch / Lightning / Jittor weight files without torch and without running their code,
the weight converter, and LPIPS weights from torchvision / lpips files.

The PyTorch files are written here with zipfile + a pure-Python pickler, in torch.save's layout
(``archive/data.pkl`` protocol 2 with persistent storage ids, ``archive/data/KEY`` raw storages,
``archive/byteorder``), so no torch is needed; the reader was also checked once against files
written by torch.save itself.
"""

import collections
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from weights.checkpoint import WeightsError, read_checkpoint
from weights.foreign import UnsafeFileError, find_prefix, read_weights, select_weights


# ------------------------------------------------------------------ torch.save's layout, without torch
class GlobalRef:
    """A module.name reference pickled as GLOBAL (the classes and functions torch would name)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("only pickled, never called")


STORAGE_CLASSES = {np.dtype("float32"): "FloatStorage", np.dtype("float16"): "HalfStorage",
                   np.dtype("int64"): "LongStorage", np.dtype("bool"): "BoolStorage",
                   np.dtype("uint16"): "BFloat16Storage"}  # bfloat16 bits are written as uint16 here
REBUILD = GlobalRef("torch._utils", "_rebuild_tensor_v2")
REBUILD_PARAMETER = GlobalRef("torch._utils", "_rebuild_parameter")
STORAGE_REFS = {cls: GlobalRef("torch", cls) for cls in STORAGE_CLASSES.values()}


class FakeStorage:
    def __init__(self, key, values):
        self.key, self.values = key, np.ascontiguousarray(values).ravel()


class FakeTensor:
    """Pickles like a torch tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride, parameter=False):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())
        self.parameter = parameter

    def __reduce_ex__(self, protocol):
        if self.parameter:
            return REBUILD_PARAMETER, (FakeTensor(*self.args[:4]), True, collections.OrderedDict())
        return REBUILD, self.args


class TorchLikePickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    dispatch[GlobalRef] = save_global_ref

    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", STORAGE_REFS[STORAGE_CLASSES[obj.values.dtype]], obj.key, "cpu", obj.values.size)
        return None


def tensors_of(arrays):
    """Each array as a contiguous tensor on its own storage; the storages to write."""
    storages, tensors = [], {}
    for i, (name, array) in enumerate(arrays.items()):
        storage = FakeStorage(str(i), array)
        storages.append(storage)
        strides = tuple(int(s) // array.itemsize for s in np.array(array, order="C").strides)
        tensors[name] = FakeTensor(storage, 0, array.shape, strides)
    return tensors, storages


def write_torch_zip(path, obj, storages, top="archive"):
    buffer = io.BytesIO()
    TorchLikePickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{top}/data.pkl", buffer.getvalue())
        archive.writestr(f"{top}/byteorder", "little")
        for storage in storages:
            archive.writestr(f"{top}/data/{storage.key}", storage.values.tobytes())
        archive.writestr(f"{top}/version", "3\n")


class LegacyPickler(TorchLikePickler):
    """Storage references as PyTorch's legacy (pre-1.6) format writes them: one more field, the view."""

    def persistent_id(self, obj):
        pid = super().persistent_id(obj)
        return None if pid is None else pid + (None,)


def write_torch_legacy(path, obj, storages, cut=0):
    """torch.save's pre-1.6 layout: magic, protocol, system info, the object, the storage keys,
    then each storage as an int64 count and its elements."""
    from weights.foreign import TORCH_LEGACY_MAGIC

    buffer = io.BytesIO()
    for value in (TORCH_LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                              "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(value, buffer, protocol=2)
    LegacyPickler(buffer, protocol=2).dump(obj)
    pickle.dump([storage.key for storage in storages], buffer, protocol=2)
    for storage in storages:
        buffer.write(np.int64(storage.values.size).tobytes())
        buffer.write(storage.values.tobytes())
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) - cut])


# ------------------------------------------------------------------ taming's names, from its layout
def taming_vq_shapes(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, embed_dim,
                     n_embed, in_channels=3, out_ch=3):
    """Name -> shape of LDM's VQModel (ldm/modules/diffusionmodules/model.py Encoder/Decoder,
    taming's VectorQuantizer2, quant_conv, post_quant_conv), following the reference's loops."""
    shapes = {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels, in_mult = len(ch_mult), (1,) + tuple(ch_mult)
    conv("encoder.conv_in", in_channels, ch, 3)
    res = resolution
    for i in range(levels):
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for b in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{b}", block_in, block_out)
            block_in = block_out
            if res in attn_resolutions:
                attn(f"encoder.down.{i}.attn.{b}", block_in)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            res //= 2
    for part in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        resnet(f"{part}.mid.block_1", c, c), attn(f"{part}.mid.attn_1", c), resnet(f"{part}.mid.block_2", c, c)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, z_channels, 3)
    block_in, res = ch * ch_mult[-1], resolution // 2 ** (levels - 1)
    conv("decoder.conv_in", z_channels, block_in, 3)
    for i in reversed(range(levels)):
        block_out = ch * ch_mult[i]
        for b in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{b}", block_in, block_out)
            block_in = block_out
            if res in attn_resolutions:
                attn(f"decoder.up.{i}.attn.{b}", block_in)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            res *= 2
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, out_ch, 3)
    shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    conv("quant_conv", z_channels, embed_dim, 1)
    conv("post_quant_conv", embed_dim, z_channels, 1)
    return shapes


TINY = dict(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=256, z_channels=3,
            embed_dim=3, n_embed=64)


def taming_state(seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in taming_vq_shapes(**TINY).items()}


def loss_state(seed=1):
    rng = np.random.default_rng(seed)
    return {"loss.discriminator.main.0.weight": rng.standard_normal((8, 3, 4, 4)).astype(np.float32),
            "loss.discriminator.main.3.num_batches_tracked": np.array(7, np.int64),
            "loss.perceptual_loss.lin0.model.1.weight": rng.standard_normal((1, 64, 1, 1)).astype(np.float32)}


def write_lightning(path, weights, callbacks=None):
    tensors, storages = tensors_of(weights)
    checkpoint = {"epoch": 4, "global_step": 1200, "pytorch-lightning_version": "1.4.2",
                  "state_dict": collections.OrderedDict(tensors),
                  "callbacks": callbacks if callbacks is not None else {
                      GlobalRef("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"):
                          {"best_model_score": 0.5, "dirpath": "/runs"}},
                  "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.5, 0.9)}]}],
                  "lr_schedulers": []}
    write_torch_zip(path, checkpoint, storages)


# ----------------------------------------------------------------------------------- torch files
def test_torch_zip_tensors_rebuilt_from_storage_offset_size_stride(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    shared = FakeStorage("0", base)
    half = FakeStorage("1", base.astype(np.float16))
    bf16_bits = (base.view(np.uint32) >> 16).astype(np.uint16)   # these floats are exact in bfloat16
    bf16 = FakeStorage("2", bf16_bits)
    longs = FakeStorage("3", np.arange(5, dtype=np.int64))
    flags = FakeStorage("4", np.array([True, False, True]))
    obj = collections.OrderedDict(
        transposed=FakeTensor(shared, 0, (6, 4), (1, 6)),          # base.T: a non-contiguous view
        row=FakeTensor(shared, 6, (6,), (1,)),                     # base[1]: storage offset
        column=FakeTensor(shared, 2, (4,), (6,)),                  # base[:, 2]
        scalar=FakeTensor(shared, 23, (), ()),
        half=FakeTensor(half, 0, (4, 6), (6, 1)),
        bf16=FakeTensor(bf16, 0, (4, 6), (6, 1)),
        longs=FakeTensor(longs, 1, (2, 2), (2, 1)),
        flags=FakeTensor(flags, 0, (3,), (1,)),
        param=FakeTensor(shared, 0, (2, 3), (6, 1), parameter=True),
        nested={"inner": FakeTensor(shared, 12, (2, 2), (1, 2))},
    )
    write_torch_zip(tmp_path / "kinds.pt", obj, [shared, half, bf16, longs, flags], top="kinds")
    arrays, info = read_weights(tmp_path / "kinds.pt")
    assert info.format == "torch-zip" and info.layout == "state_dict"
    np.testing.assert_array_equal(arrays["transposed"], base.T)
    np.testing.assert_array_equal(arrays["row"], base[1])
    np.testing.assert_array_equal(arrays["column"], base[:, 2])
    assert arrays["scalar"].shape == () and arrays["scalar"] == 23
    assert arrays["half"].dtype == np.float16
    np.testing.assert_array_equal(arrays["half"], base.astype(np.float16))
    assert arrays["bf16"].dtype == np.float32
    np.testing.assert_array_equal(arrays["bf16"], base)
    np.testing.assert_array_equal(arrays["longs"], [[1, 2], [3, 4]])
    np.testing.assert_array_equal(arrays["flags"], [True, False, True])
    np.testing.assert_array_equal(arrays["param"], base[:2, :3])
    np.testing.assert_array_equal(arrays["nested.inner"], base.reshape(-1)[12:16].reshape(2, 2, order="F"))


def test_legacy_torch_format_as_pytorch_fid_ships_its_inception(tmp_path):
    """pt_inception-2015-12-05-6726825d.pth predates PyTorch 1.6: a plain state dict in the legacy
    layout. Its arrays come back exactly; a truncated file is refused by name."""
    rng = np.random.default_rng(4)
    weights = {"Conv2d_1a_3x3.conv.weight": rng.standard_normal((32, 3, 3, 3)).astype(np.float32),
               "Conv2d_1a_3x3.bn.running_var": rng.random(32).astype(np.float32),
               "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7, np.int64),
               "fc.weight": rng.standard_normal((4, 6)).astype(np.float32).T}   # a transposed view
    tensors, storages = tensors_of(weights)
    write_torch_legacy(tmp_path / "inception.pth", collections.OrderedDict(tensors), storages)
    arrays, info = read_weights(tmp_path / "inception.pth")
    assert info.format == "torch-legacy"
    assert set(arrays) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(arrays[name], value)
    write_torch_legacy(tmp_path / "cut.pth", collections.OrderedDict(tensors), storages, cut=10)
    with pytest.raises(WeightsError, match="cut.pth: storage 3 is truncated"):
        read_weights(tmp_path / "cut.pth")


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    storage = FakeStorage("0", np.zeros(6, np.float32))
    write_torch_zip(tmp_path / "bad.pt", {"w": FakeTensor(storage, 2, (2, 3), (3, 1))}, [storage])
    with pytest.raises(WeightsError, match="bad.pt.*reaches past its storage of 6 elements"):
        read_weights(tmp_path / "bad.pt")


def test_lightning_checkpoint_loads_by_taming_names_with_loss_keys_reported(jt, tmp_path):
    from autoencoder.vqmodel import VQModel, vq_config
    from weights.checkpoint import load_weights, module_arrays, module_shapes

    weights = taming_state()
    write_lightning(tmp_path / "last.ckpt", {**weights, **loss_state()})
    arrays, info = read_weights(tmp_path / "last.ckpt")
    assert info.layout == "lightning"
    assert info.ignored_sections == ["callbacks", "optimizer_states", "lr_schedulers"]
    assert info.refused == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert info.values == {"epoch": 4, "global_step": 1200, "pytorch-lightning_version": "1.4.2"}
    selection = select_weights(arrays)
    assert sorted(selection.dropped["loss."]) == sorted(loss_state())
    assert "ignored 3 training-only weight(s) under 'loss.'" in selection.describe()[0]

    model = VQModel(vq_config("tiny"))
    assert module_shapes(model) == taming_vq_shapes(**TINY)   # every name and shape of taming's layout
    load_weights(model, selection.weights, "last.ckpt")       # strict: raises on any missing key
    loaded = module_arrays(model)
    for name, value in weights.items():
        np.testing.assert_array_equal(loaded[name], value)


def test_vq_f4_names_and_shapes_equal_the_reference_layout(jt):
    from autoencoder.vqmodel import VQModel, vq_config
    from weights.checkpoint import module_shapes

    expected = taming_vq_shapes(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
                                z_channels=3, embed_dim=3, n_embed=8192)
    shapes = module_shapes(VQModel(vq_config("vq-f4")))
    assert shapes == expected
    for name in ("encoder.down.0.block.0.norm1.weight", "encoder.mid.attn_1.q.weight",
                 "decoder.up.2.upsample.conv.weight", "quantize.embedding.weight", "quant_conv.weight",
                 "post_quant_conv.weight", "encoder.conv_out.weight", "decoder.norm_out.weight"):
        assert name in shapes
    assert sum(int(np.prod(s)) for s in shapes.values()) == 55_322_782


def test_attention_levels_follow_attn_resolutions(jt):
    from autoencoder.vqmodel import VQModel, VQConfig
    from weights.checkpoint import module_shapes

    layout = dict(TINY, attn_resolutions=(128,))
    config = VQConfig(num_groups=4, **layout)
    assert module_shapes(VQModel(config)) == taming_vq_shapes(**layout)


# ---------------------------------------------------------------------------------- Jittor files
def test_jittor_pkl_round_trip_and_checksum(jt, tmp_path):
    rng = np.random.default_rng(0)
    state = {"encoder.conv_in.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "quantize.embedding.weight": rng.standard_normal((64, 3)).astype(np.float32)}
    jt.save({k: jt.array(v) for k, v in state.items()}, str(tmp_path / "model.pkl"))
    arrays, info = read_weights(tmp_path / "model.pkl")
    assert info.format == "jittor-pkl"
    assert set(arrays) == set(state)
    for name, value in state.items():
        np.testing.assert_array_equal(arrays[name], value)
    data = bytearray((tmp_path / "model.pkl").read_bytes())
    data[40] ^= 0xFF
    (tmp_path / "corrupt.pkl").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="corrupt.pkl: Jittor file checksum does not match"):
        read_weights(tmp_path / "corrupt.pkl")


def test_plain_pickles_of_numpy_arrays_any_protocol(tmp_path):
    from weights.foreign import LazyArray, open_weights

    large = np.arange(40_000, dtype=">f4").reshape(200, 200).T     # 160 kB: left in the file until read
    arrays = {"a": np.arange(6, dtype=">f8").reshape(2, 3), "b": np.ones((2, 2), np.int32, order="F"),
              "large": np.asfortranarray(large)}
    for protocol in (2, 4, 5):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps({**arrays, "s": np.float32(2.5)}, protocol=protocol))
        got, _ = read_weights(path)
        for name, value in arrays.items():
            np.testing.assert_array_equal(got[name], value)
            assert got[name].dtype == value.dtype.newbyteorder("=")
        assert got["s"] == np.float32(2.5)
        lazy, _ = open_weights(path)
        assert isinstance(lazy["large"], LazyArray) == (protocol >= 4)   # protocol 2 pickles bytes as text
        assert lazy["large"].shape == (200, 200) and lazy["large"].dtype == np.dtype("float32")
        np.testing.assert_array_equal(np.asarray(lazy["large"]), large)
    data = (tmp_path / "p4.pkl").read_bytes()
    (tmp_path / "cut.pkl").write_bytes(data[:len(data) // 2])
    with pytest.raises(WeightsError, match="cut.pkl: .*(cut short|reaches past the end of the file)"):
        read_weights(tmp_path / "cut.pkl")


def test_large_jittor_arrays_and_safetensors_are_read_lazily(jt, tmp_path):
    from safetensors.numpy import save_file

    from weights.foreign import LazyArray, open_weights

    rng = np.random.default_rng(1)
    state = {"w": rng.standard_normal((64, 32, 3, 3)).astype(np.float32), "b": np.arange(4, dtype=np.float32)}
    jt.save({k: jt.array(v) for k, v in state.items()}, str(tmp_path / "big.pkl"))
    lazy, info = open_weights(tmp_path / "big.pkl")
    assert info.format == "jittor-pkl" and isinstance(lazy["w"], LazyArray)
    np.testing.assert_array_equal(lazy["w"].numpy(), state["w"])
    np.testing.assert_array_equal(np.asarray(lazy["b"]), state["b"])

    bf16 = (state["w"].view(np.uint32) >> 16).astype(np.uint16)    # bit patterns, read back as float32
    save_file({"w": state["w"], "half": state["b"].astype(np.float16)}, str(tmp_path / "plain.safetensors"))
    lazy, info = open_weights(tmp_path / "plain.safetensors")
    assert info.format == "safetensors" and all(isinstance(v, LazyArray) for v in lazy.values())
    np.testing.assert_array_equal(lazy["w"].numpy(), state["w"])
    assert lazy["half"].numpy().dtype == np.float16
    header = json.dumps({"w": {"dtype": "BF16", "shape": [64, 32, 3, 3], "data_offsets": [0, bf16.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bf16.tobytes())
    lazy, _ = open_weights(tmp_path / "bf16.safetensors")
    np.testing.assert_array_equal(lazy["w"].numpy(), (bf16.astype(np.uint32) << 16).view(np.float32))


# ----------------------------------------------------------------------------- hostile files
class RunsCode:
    def __init__(self, func, argument):
        self.func, self.argument = func, argument

    def __reduce__(self):
        return self.func, (self.argument,)


def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    cases = {
        "top.pkl": RunsCode(os.system, command),
        "inside.pkl": {"w": np.zeros(2, np.float32), "x": RunsCode(os.system, command)},
        "eval.pkl": {"w": RunsCode(eval, f"__import__('os').system('{command}')")},
    }
    for name, obj in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(UnsafeFileError, match=rf"{name}: refused to load (posix\.system|__builtin__\.eval)"):
            read_weights(tmp_path / name)
        with pytest.raises(UnsafeFileError, match=rf"{name}: refused to load"):
            read_weights(tmp_path / name, strict=True)
    # Inside a PyTorch zip, in the weights.
    tensors, storages = tensors_of({"w": np.zeros(3, np.float32)})
    write_torch_zip(tmp_path / "evil.pt", {**tensors, "hook": RunsCode(GlobalRef("os", "system"), command)}, storages)
    with pytest.raises(UnsafeFileError, match=r"evil.pt: refused to load os\.system \(found at 'hook'\)"):
        read_weights(tmp_path / "evil.pt")
    assert not marker.exists()


def test_code_in_ignored_lightning_sections_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    weights = {"w": np.arange(3, dtype=np.float32)}
    write_lightning(tmp_path / "evil.ckpt", weights,
                    callbacks={"cb": RunsCode(GlobalRef("os", "system"), f"touch {marker}")})
    arrays, info = read_weights(tmp_path / "evil.ckpt")
    np.testing.assert_array_equal(arrays["w"], weights["w"])
    assert info.refused == ["os.system"] and "callbacks" in info.ignored_sections
    assert any("os.system" in line for line in info.describe())
    with pytest.raises(UnsafeFileError, match=r"evil.ckpt: refused to load os\.system"):
        read_weights(tmp_path / "evil.ckpt", strict=True)
    assert not marker.exists()


def test_object_arrays_and_unknown_formats_are_refused(tmp_path):
    (tmp_path / "objects.pkl").write_bytes(pickle.dumps({"w": np.array([1, "a"], dtype=object)}, protocol=4))
    with pytest.raises(WeightsError, match="objects.pkl: arrays of dtype object are not allowed"):
        read_weights(tmp_path / "objects.pkl")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(WeightsError, match="text.pt: unknown format"):
        read_weights(tmp_path / "text.pt")
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(WeightsError, match="legacy.pt: not a readable legacy PyTorch file"):
        read_weights(tmp_path / "legacy.pt")


def test_select_weights_and_find_prefix():
    arrays = {"first_stage_model.encoder.conv_in.weight": np.zeros(1), "first_stage_model.quant_conv.bias": np.zeros(1),
              "model.diffusion_model.out.0.weight": np.zeros(1), "loss.x": np.zeros(1)}
    prefix = find_prefix(arrays, "encoder.conv_in.weight", ("", "first_stage_model."))
    assert prefix == "first_stage_model."
    selection = select_weights(arrays, prefix=prefix)
    assert sorted(selection.weights) == ["encoder.conv_in.weight", "quant_conv.bias"]
    assert selection.dropped == {"loss.": ["loss.x"]}
    assert selection.outside_prefix == ["model.diffusion_model.out.0.weight"]
    assert find_prefix(["vq.encoder.conv_in.weight"], "encoder.conv_in.weight") == "vq."


# ----------------------------------------------------------------------------------- converter
def project_config(path, network):
    """A --config file in this project's layout: the tiny presets' group norms (4) are not
    upstream's (32), so a foreign file built with them must say so."""
    import json

    path.write_text(json.dumps({"network": network.to_dict()}))
    return str(path)


def test_converter_round_trip_and_plain_word_report(jt, tmp_path, capsys):
    from autoencoder.vqmodel import load_vqmodel, vq_config
    from weights.checkpoint import module_arrays
    from tools.convert_weights import main

    weights = taming_state()
    write_lightning(tmp_path / "last.ckpt", {**weights, **loss_state()})
    tiny = project_config(tmp_path / "tiny.json", vq_config("tiny"))
    assert main(["--kind", "vqmodel", "--config", tiny, str(tmp_path / "last.ckpt"), str(tmp_path / "vq.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "ignored 3 training-only weight(s) under 'loss.'" in out
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in out
    arrays, info = read_checkpoint(tmp_path / "vq.safetensors")
    assert info["kind"] == "vqmodel" and info["config"]["network"]["ch"] == 8 and info["config"]["network"]["n_embed"] == 64
    assert info["extra"]["source_values"]["global_step"] == 1200
    assert set(arrays) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(arrays[name], value)
    loaded = module_arrays(load_vqmodel(tmp_path / "vq.safetensors"))
    np.testing.assert_array_equal(loaded["decoder.conv_out.weight"], weights["decoder.conv_out.weight"])

    # float16 storage: float weights halved, loaded back as the network's float32.
    assert main([str(tmp_path / "vq.safetensors"), str(tmp_path / "half.safetensors"), "--dtype", "float16"]) == 0
    half, _ = read_checkpoint(tmp_path / "half.safetensors")
    assert {v.dtype for v in half.values()} == {np.dtype("float16")}
    reloaded = module_arrays(load_vqmodel(tmp_path / "half.safetensors"))
    np.testing.assert_array_equal(reloaded["decoder.conv_out.weight"],
                                  weights["decoder.conv_out.weight"].astype(np.float16).astype(np.float32))

    # This project's own checkpoint converts to itself, config taken from the file.
    assert main([str(tmp_path / "vq.safetensors"), str(tmp_path / "again.safetensors")]) == 0
    again, again_info = read_checkpoint(tmp_path / "again.safetensors")
    assert again_info["config"] == info["config"]
    for name in weights:
        np.testing.assert_array_equal(again[name], arrays[name])

    # A whole-LDM-style file: the autoencoder is found under first_stage_model.
    prefixed = {f"first_stage_model.{k}": v for k, v in weights.items()}
    prefixed["model.diffusion_model.out.2.weight"] = np.zeros((3, 4, 3, 3), np.float32)
    tensors, storages = tensors_of(prefixed)
    write_torch_zip(tmp_path / "ldm.ckpt", {"state_dict": tensors}, storages)
    assert main(["--config", tiny, str(tmp_path / "ldm.ckpt"), str(tmp_path / "from_ldm.safetensors")]) == 0
    assert "weights under 'first_stage_model.'" in capsys.readouterr().out


def test_converter_lists_misfits_and_writes_nothing(jt, tmp_path, capsys):
    from autoencoder.vqmodel import vq_config
    from tools.convert_weights import main

    weights = taming_state()
    del weights["decoder.norm_out.bias"]
    weights["extra.weight"] = np.zeros(2, np.float32)
    weights["quant_conv.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    tensors, storages = tensors_of(weights)
    write_torch_zip(tmp_path / "bad.pth", tensors, storages)
    tiny = project_config(tmp_path / "tiny.json", vq_config("tiny"))
    assert main(["--config", tiny, str(tmp_path / "bad.pth"), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "nothing was written" in err
    assert "The file lacks 1 weight(s) the network needs:\n  decoder.norm_out.bias (8,)" in err
    assert "The file has 1 weight(s) the network does not have" in err and "extra.weight (2,)" in err
    assert "quant_conv.weight: the network has (3, 3, 1, 1), the file (3, 3, 3, 3)" in err
    assert not (tmp_path / "out.safetensors").exists()

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"w": RunsCode(os.system, "true")}, protocol=2))
    assert main([str(tmp_path / "evil.pkl"), str(tmp_path / "out.safetensors")]) == 1
    assert "refused to load posix.system" in capsys.readouterr().err


def test_converter_unet_from_sdm_state_dict_and_class_count_mismatch(jt, tmp_path, capsys):
    """An SDM-style .pt (names under "module.", as a DDP-wrapped save) converts by name to a
    U-Net checkpoint that loads; a file for 30 classes is refused naming the SPADE convolutions."""
    from weights.checkpoint import load_weights, module_arrays
    from models import UNetModel, unet_preset
    from tools.convert_weights import main

    rng = np.random.default_rng(3)
    reference = {k: rng.standard_normal(v.shape).astype(np.float32)
                 for k, v in module_arrays(UNetModel(unet_preset("tiny"))).items()}
    tensors, storages = tensors_of({f"module.{k}": v for k, v in reference.items()})
    write_torch_zip(tmp_path / "ema_0.9999_000100.pt", tensors, storages)
    tiny = project_config(tmp_path / "tiny.json", unet_preset("tiny"))
    assert main(["--kind", "unet", "--config", tiny, str(tmp_path / "ema_0.9999_000100.pt"),
                 str(tmp_path / "unet.safetensors"), "--schedule", "linear:1000", "--latent_scale", "1"]) == 0
    assert "weights under 'module.'" in capsys.readouterr().out
    arrays, info = read_checkpoint(tmp_path / "unet.safetensors")
    assert info["kind"] == "unet" and info["config"]["network"]["model_channels"] == 16
    network = UNetModel(unet_preset("tiny"))
    load_weights(network, arrays, "unet.safetensors")
    loaded = module_arrays(network)
    assert set(loaded) == set(reference)
    for name, value in reference.items():
        np.testing.assert_array_equal(loaded[name], value)

    wrong = {k: v for k, v in module_arrays(UNetModel(unet_preset("tiny", num_classes=30))).items()}
    tensors, storages = tensors_of(wrong)
    write_torch_zip(tmp_path / "thirty.pt", tensors, storages)
    assert main(["--kind", "unet", "--config", tiny, str(tmp_path / "thirty.pt"),
                 str(tmp_path / "bad.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "nothing was written" in err
    assert "middle_block.0.in_norm.mlp_shared.0.weight: the network has (16, 29, 3, 3), the file (16, 30, 3, 3)" in err
    assert not (tmp_path / "bad.safetensors").exists()


# ------------------------------------------------------------------------------------ LPIPS
def _conv3x3(x, w, b):
    """3x3 cross-correlation with zero padding 1: x [C, H, W], w [O, C, 3, 3], b [O] -> [O, H, W]."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    h, wd = x.shape[1:]
    patches = np.stack([padded[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], axis=1)  # [C, 9, H, W]
    return np.einsum("ock,ckhw->ohw", w.reshape(w.shape[0], w.shape[1], 9), patches) + b[:, None, None]


def lpips_numpy(x, y, vgg, heads):
    """LPIPS-VGG in float64 numpy, written from the paper / taming's lpips.py."""
    from autoencoder.lpips import SCALE, SHIFT

    def features(image):
        h = (image - np.array(SHIFT)[:, None, None]) / np.array(SCALE)[:, None, None]
        out = []
        for i in range(30):
            if f"features.{i}.weight" in vgg:
                h = np.maximum(_conv3x3(h, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"]), 0)
            elif i in (4, 9, 16, 23):
                c, hh, ww = h.shape
                h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(c, hh // 2, 2, ww // 2, 2).max(axis=(2, 4))
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    total = 0.0
    for k, (fx, fy) in enumerate(zip(features(x), features(y))):
        nx = fx / (np.sqrt((fx ** 2).sum(0, keepdims=True)) + 1e-10)
        ny = fy / (np.sqrt((fy ** 2).sum(0, keepdims=True)) + 1e-10)
        total += np.einsum("c,chw->hw", heads[k].reshape(-1), (nx - ny) ** 2).mean()
    return total


def test_lpips_from_torchvision_and_lpips_files_matches_numpy(jt, tmp_path):
    from autoencoder.lpips import VGG16_CONVS, load_lpips

    rng = np.random.default_rng(0)
    vgg = {}
    for i, (cin, cout) in VGG16_CONVS.items():
        vgg[f"features.{i}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        vgg[f"features.{i}.bias"] = (0.01 * rng.standard_normal(cout)).astype(np.float32)
    classifier = {"classifier.0.weight": np.zeros((4, 4), np.float32)}
    heads = [rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32) for c in (64, 128, 256, 512, 512)]
    tensors, storages = tensors_of({**vgg, **classifier})
    write_torch_zip(tmp_path / "vgg16.pth", tensors, storages)
    tensors, storages = tensors_of({f"lin{k}.model.1.weight": w for k, w in enumerate(heads)})
    write_torch_zip(tmp_path / "vgg.pth", tensors, storages)
    lpips = load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    got = lpips(jt.array(x), jt.array(y)).numpy()
    assert got.shape == (2, 1, 1, 1)
    vgg64 = {k: v.astype(np.float64) for k, v in vgg.items()}
    expected = [lpips_numpy(x[b].astype(np.float64), y[b].astype(np.float64), vgg64, heads) for b in range(2)]
    np.testing.assert_allclose(got.reshape(2), expected, rtol=2e-4)
    assert np.all(lpips(jt.array(x), jt.array(x)).numpy() == 0)
    with pytest.raises(WeightsError, match="no LPIPS heads found"):
        load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg16.pth")
