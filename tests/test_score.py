"""scoring/challenge.py and tools/score.py: T against the IIDM paper's tables, the `total` command,
and whole scoring runs on a tiny synthetic test split with plug-in models whose outputs are known in closed form."""

import csv
import json

import numpy as np
import pytest

from scoring.challenge import METRICS, result_problem, score_terms, total_lines, total_score
from tools import score

# (M, A, FID, S, T) as printed in the IIDM paper, Table 1 (methods) and Table 2 (ablation).
PAPER_ROWS = {
    "SEAN": (76.03, 47.72, 75.36, 68.38, 35.82),
    "SCGAN": (87.74, 49.14, 56.13, 30.66, 45.06),
    "GauGAN": (89.54, 49.59, 43.39, 54.42, 54.96),
    "CLADE": (92.09, 50.98, 40.63, 48.14, 57.18),
    "DM": (91.01, 49.12, 35.41, 27.90, 55.79),
    "I2I": (93.76, 49.61, 32.98, 62.68, 63.60),
    "I2I+RF": (94.57, 50.43, 30.63, 49.24, 63.51),
    "I2I+RF+CT": (94.11, 49.78, 31.38, 66.03, 65.09),
}
# The IIDM row (94.15, 50.43, 30.75, 63.76) gives 65.22 by Eq. 8, 0.048 below the printed 65.27.
IIDM_ROW = (94.15, 50.43, 30.75, 63.76, 65.27)


@pytest.mark.parametrize("name", sorted(PAPER_ROWS))
def test_total_reproduces_the_papers_rows(name):
    m, a, fid, s, t = PAPER_ROWS[name]
    assert total_score(m, a, fid, s) == pytest.approx(t, abs=0.011)


def test_total_of_the_iidm_row_is_within_the_papers_rounding_slack():
    m, a, fid, s, t = IIDM_ROW
    assert abs(total_score(m, a, fid, s) - t) < 0.05


def test_fid_is_capped_at_100_and_terms_add_up():
    assert total_score(90, 50, 250, 40) == total_score(90, 50, 100, 40) == pytest.approx(0.9 * (10 + 21 + 0))
    terms = score_terms(M=90, A=50, FID=30, S=40)
    assert terms["M/100"] * (terms["0.2*A"] + terms["0.3*(S*0.5+50)"] + terms["0.5*(100-FID)"]) == \
        pytest.approx(total_score(90, 50, 30, 40))
    with pytest.raises(ValueError, match="A"):
        total_score(90, None, 30, 40)


def test_total_command_prints_t_or_says_what_is_missing(capsys):
    assert score.main(["total", "--M", "91.01", "--A", "49.12", "--FID", "35.41", "--S", "27.90"]) == 0
    assert "T: 55.79" in capsys.readouterr().out
    assert score.main(["total", "--A", "49.12", "--FID", "35.41", "--S", "27.90"]) == 0
    out = capsys.readouterr().out
    assert "T: not computed (M skipped)" in out
    assert not any(line.startswith("T: ") and "not computed" not in line for line in out.splitlines())
    assert "0.2*A = 9.82" in out


def test_total_lines_name_every_missing_metric():
    lines = total_lines({"M": None, "A": None, "FID": 20.0, "S": 50.0})
    assert lines[0] == "T: not computed (M, A skipped)"


# ------------------------------------------------------------------------------ scoring runs
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from datasets.synthetic import write_dataset

    root = tmp_path_factory.mktemp("syn")
    write_dataset(root, n=8, height=24, width=32, seed=3, n_test=4)
    return root


def run_args(root, results, *extra):
    return ["--results", str(results), "--input_path", str(root / "test" / "labels"),
            "--mapping", str(root / "test" / "labels" / "label_to_img.json"), "--img_path", str(root / "train"),
            "--cpu", *extra]


def expected_s(root, names, mode="challenge"):
    from scoring.style_similarity import read_bgr, style_similarity

    mapping = json.loads((root / "test" / "labels" / "label_to_img.json").read_text())
    values = [style_similarity(read_bgr(root / "test" / "imgs" / f"{n}.jpg"),
                               read_bgr(root / "train" / "imgs" / mapping[f"{n}.png"]), mode).value
              for n in names]
    return 100 * float(np.mean(values))


def test_style_only_run_writes_csv_and_json_and_does_not_pretend_t(synthetic, tmp_path, capsys):
    results = synthetic / "test" / "imgs"     # the ground truth photos stand in for results
    status = score.main(run_args(synthetic, results, "--csv", str(tmp_path / "s.csv"),
                                 "--json", str(tmp_path / "s.json")))
    assert status == 0
    out = capsys.readouterr().out
    assert "T: not computed (M, A, FID skipped)" in out
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    names = sorted(p.stem for p in (synthetic / "test" / "labels").glob("*.png"))
    assert [r["name"] for r in rows] == names
    assert all(r["pixel_accuracy"] == "" and r["aesthetic"] == "" for r in rows)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["metrics"]["T"] is None
    assert set(summary["skipped"]) == {"M", "A", "FID"}
    assert summary["metrics"]["S"] == pytest.approx(expected_s(synthetic, names), abs=1e-9)
    assert summary["style_similarity"]["corrected"]["S"] == pytest.approx(
        expected_s(synthetic, names, "corrected"), abs=1e-9)
    assert summary["metrics"]["S"] == pytest.approx(np.mean([float(r["S"]) for r in rows]), abs=1e-3)


def test_a_missing_result_is_named_and_nothing_is_written(synthetic, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(synthetic / "test" / "imgs", results)
    victim = sorted(results.glob("*.jpg"))[1]
    victim.unlink()
    assert score.main(run_args(synthetic, results)) == 1
    assert victim.name in capsys.readouterr().err
    assert not (results / "scores.csv").exists() and not (results / "scores.json").exists()


def cut_in_half(path):
    """Keep a JPEG's headers and the first half of its compressed scan (a write killed midway)."""
    data = path.read_bytes()
    scan = data.index(b"\xff\xda")
    path.write_bytes(data[:scan + (len(data) - scan) // 2])


def bad_results(synthetic, folder):
    """A copy of the ground-truth photos with four bad results: a JPEG cut in half, an empty file,
    a text file named .jpg and a whole JPEG of the wrong size; returns {name: expected problem}."""
    import shutil

    from PIL import Image

    shutil.copytree(synthetic / "test" / "imgs", folder)
    paths = sorted(folder.glob("*.jpg"))
    assert len(paths) == 4
    cut, empty, text, small = paths
    cut_in_half(cut)
    empty.write_bytes(b"")
    text.write_text("this is not a picture\n")
    Image.new("RGB", (16, 12), (10, 200, 30)).save(small, quality=95)
    return {cut.stem: "cannot be decoded in full", empty.stem: "empty file (0 bytes)",
            text.stem: "not an image file", small.stem: "12x16 (height x width), but its mask is 24x32"}


def test_a_jpeg_cut_in_half_is_what_opencv_reads_without_complaint(synthetic, tmp_path):
    """Why the scorer decodes with PIL: cv2.imread returns a half JPEG as a whole image."""
    from scoring.style_similarity import read_bgr

    path = tmp_path / "cut.jpg"
    path.write_bytes(sorted((synthetic / "test" / "imgs").glob("*.jpg"))[0].read_bytes())
    cut_in_half(path)
    assert read_bgr(path).shape == (24, 32, 3)
    assert result_problem(path, 24, 32).startswith("cannot be decoded in full")


def test_bad_results_stop_the_run_with_every_one_listed(synthetic, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    expected = bad_results(synthetic, results)

    def load(args):
        raise AssertionError("a model was loaded before the results were checked")

    monkeypatch.setattr(score, "_load_models", load)
    assert score.main(run_args(synthetic, results)) == 1
    err = capsys.readouterr().err
    assert "4 result(s) cannot be scored" in err and "--skip_bad" in err
    for name, problem in expected.items():
        assert f"{results / name}.jpg: {problem}" in err
    assert not (results / "scores.csv").exists() and not (results / "scores.json").exists()


def test_skip_bad_scores_the_rest_and_lists_the_bad_in_the_summary(synthetic, tmp_path, capsys):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(synthetic / "test" / "imgs", results)
    paths = sorted(results.glob("*.jpg"))
    cut_in_half(paths[1])
    paths[3].write_bytes(b"")
    assert score.main(run_args(synthetic, results, "--skip_bad")) == 0
    assert "2 bad result(s) not scored" in capsys.readouterr().out
    summary = json.loads((results / "scores.json").read_text())
    assert summary["images"] == 2
    assert [(b["name"], b["file"]) for b in summary["bad_results"]] == [(p.stem, str(p)) for p in (paths[1], paths[3])]
    good = [paths[0].stem, paths[2].stem]
    assert summary["metrics"]["S"] == pytest.approx(expected_s(synthetic, good), abs=1e-9)
    assert [r["name"] for r in csv.DictReader(open(results / "scores.csv"))] == good


def test_skip_bad_with_nothing_good_left_is_an_error(synthetic, tmp_path, capsys):
    results = tmp_path / "results"
    bad_results(synthetic, results)
    assert score.main(run_args(synthetic, results, "--skip_bad")) == 1
    assert "4 result(s) cannot be scored" in capsys.readouterr().err


@pytest.mark.parametrize("options, message", [
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--inception", "/nonexistent/pt_inception.pth"], "--inception /nonexistent/pt_inception.pth: not found"),
])
def test_bad_options_exit_2_before_anything_is_read(synthetic, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_:
        score.main(run_args(synthetic, synthetic / "test" / "imgs", *options))
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def constant_segmenter_checkpoint(path, cls, height=24, width=32):
    """A segmenter whose head ignores its input and always predicts class ``cls``."""
    from weights.checkpoint import module_arrays, save_checkpoint
    from scoring.segmenter import CHECKPOINT_KIND, Segmenter, SegmenterConfig

    config = SegmenterConfig(widths=(4, 8), height=height, width=width)
    arrays = module_arrays(Segmenter(config))
    arrays["head.weight"][:] = 0
    arrays["head.bias"][:] = 0
    arrays["head.bias"][cls] = 5.0
    save_checkpoint(path, arrays, CHECKPOINT_KIND, {"network": config.to_dict()})


def constant_aesthetic_checkpoint(path, logits):
    """A NIMA whose classifier ignores the features: p = softmax(logits) for every image."""
    from weights.checkpoint import module_arrays, save_checkpoint
    from scoring.aesthetic import CHECKPOINT_KIND, NIMA, NimaConfig

    config = NimaConfig(stage_channels=(4, 4), convs_per_stage=(1, 1), image_size=16, resize_to=20)
    arrays = module_arrays(NIMA(config))
    arrays["classifier.1.weight"][:] = 0
    arrays["classifier.1.bias"][:] = logits
    save_checkpoint(path, arrays, CHECKPOINT_KIND, {"network": config.to_dict()})


def test_run_with_plug_in_models_fills_m_and_a_and_fid_completes_t(jt, synthetic, tmp_path, capsys,
                                                                   monkeypatch):
    from datasets import load_label
    from scoring import fid

    sky = 1
    constant_segmenter_checkpoint(tmp_path / "seg.safetensors", sky)
    logits = np.linspace(-1.0, 2.0, 10).astype(np.float32)
    constant_aesthetic_checkpoint(tmp_path / "nima.safetensors", logits)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    expected_a = 10 * float(np.sum(np.arange(1, 11) * p))

    # FID with a stand-in feature map (per-channel means and stds) instead of Inception, so the
    # expected value can be computed here; the network itself is tested in test_fid.py.
    def colour_features(batch):
        flat = batch.reshape(batch.shape[0], 3, -1).astype(np.float64)
        return np.concatenate([flat.mean(2), flat.std(2)], 1)

    monkeypatch.setattr(fid, "inception_features", lambda model: colour_features)
    monkeypatch.setattr(fid, "load_inception", lambda path: "stand-in network")
    (tmp_path / "inception.pth").write_bytes(b"weights")

    results = synthetic / "test" / "imgs"
    args = run_args(synthetic, results, "--segmenter", str(tmp_path / "seg.safetensors"),
                    "--aesthetic", str(tmp_path / "nima.safetensors"), "--inception",
                    str(tmp_path / "inception.pth"), "--fid_cache", str(tmp_path / "cache"),
                    "--json", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv"))
    assert score.main(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    metrics = summary["metrics"]

    labels = [load_label(p) for p in sorted((synthetic / "test" / "labels").glob("*.png"))]
    assert metrics["M"] == pytest.approx(100 * np.mean([np.mean(lab == sky) for lab in labels]), abs=1e-9)
    assert metrics["A"] == pytest.approx(expected_a, abs=1e-4)
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [float(r["aesthetic"]) for r in rows] == pytest.approx([expected_a] * len(rows), abs=1e-3)

    def stats(paths):
        images = np.stack([np.asarray(load_image_rgb(p), np.float64).transpose(2, 0, 1) / 255 for p in paths])
        f = colour_features(images)
        return f.mean(0), np.cov(f, rowvar=False)

    mu_r, sigma_r = stats(sorted(results.glob("*.jpg")))
    mu_t, sigma_t = stats(sorted((synthetic / "train" / "imgs").glob("*.jpg")))
    assert metrics["FID"] == pytest.approx(fid.frechet_distance(mu_r, sigma_r, mu_t, sigma_t), rel=1e-5)
    assert metrics["T"] == pytest.approx(total_score(*(metrics[n] for n in METRICS)))
    assert summary["skipped"] == {} and summary["fid"]["statistics_from_cache"] is False
    assert summary["models"]["segmenter"].endswith("seg.safetensors")
    out = capsys.readouterr().out
    assert f"T: {metrics['T']:.2f}" in out

    assert score.main(args) == 0                      # second run: training statistics from cache
    assert json.loads((tmp_path / "s.json").read_text())["fid"]["statistics_from_cache"] is True


def load_image_rgb(path):
    from datasets import load_image
    return load_image(path)


# ------------------------------------------------------------------------------ NIMA plug-in
def test_nima_names_follow_torchvision_vgg_and_the_default_is_vgg16(jt):
    from weights.checkpoint import module_shapes
    from scoring.aesthetic import NIMA, NimaConfig

    assert NimaConfig().feature_size == 512 * 7 * 7
    config = NimaConfig(stage_channels=(4, 8, 8), convs_per_stage=(2, 2, 3), image_size=16, resize_to=18)
    shapes = module_shapes(NIMA(config))
    # VGG's features: (conv, ReLU) per conv and one max pool per stage, numbered in sequence.
    assert shapes == {
        "features.0.weight": (4, 3, 3, 3), "features.0.bias": (4,),
        "features.2.weight": (4, 4, 3, 3), "features.2.bias": (4,),
        "features.5.weight": (8, 4, 3, 3), "features.5.bias": (8,),
        "features.7.weight": (8, 8, 3, 3), "features.7.bias": (8,),
        "features.10.weight": (8, 8, 3, 3), "features.10.bias": (8,),
        "features.12.weight": (8, 8, 3, 3), "features.12.bias": (8,),
        "features.14.weight": (8, 8, 3, 3), "features.14.bias": (8,),
        "classifier.1.weight": (10, 8 * 2 * 2), "classifier.1.bias": (10,),
    }


def test_nima_preprocessing_is_torchvision_resize_and_centre_crop():
    from PIL import Image

    from scoring.aesthetic import NimaConfig, mean_score, preprocess

    config = NimaConfig(stage_channels=(4,), convs_per_stage=(1,), image_size=16, resize_to=20)
    image = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    got = preprocess(image, config)
    resized = np.asarray(Image.fromarray(image).resize((30, 20), Image.BILINEAR))   # 45 * 20/30 = 30
    np.testing.assert_allclose(got, resized[2:18, 7:23].transpose(2, 0, 1) / 255.0, atol=1e-7)
    assert mean_score(np.eye(10)[[0, 9]]).tolist() == [1.0, 10.0]


def test_aesthetic_loader_checks_the_kind_and_names(jt, tmp_path):
    from safetensors.numpy import save_file

    from weights.checkpoint import WeightsError
    from scoring.aesthetic import load_aesthetic

    constant_segmenter_checkpoint(tmp_path / "seg.safetensors", 0)
    with pytest.raises(WeightsError, match="'segmenter' checkpoint"):
        load_aesthetic(tmp_path / "seg.safetensors")
    save_file({"features.0.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="features.0.weight"):
        load_aesthetic(tmp_path / "other.safetensors")


def test_networks_given_in_memory_never_share_cached_fid_statistics(jt):
    """Without a weights file the cache key is a digest of the network's arrays: the same weights
    give the same key, any other weights another one."""
    from jittor import nn

    from scoring.challenge import network_digest

    jt.set_global_seed(0)
    a, b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    assert network_digest(a) != network_digest(b)
    b.load_parameters({k: v.numpy() for k, v in a.state_dict().items()})
    assert network_digest(a) == network_digest(b)
