"""The plug-in segmenter for M: it learns a tiny synthetic set, its checkpoint round-trips through
``train.py segmenter``, and mask accuracy is plain pixel accuracy at the label map's size."""

import numpy as np
import pytest

HEIGHT, WIDTH = 24, 32
WIDTHS = "16,32,64"


@pytest.fixture(scope="module")
def train_root(tmp_path_factory):
    from datasets.synthetic import write_dataset

    root = tmp_path_factory.mktemp("segsyn")
    write_dataset(root, n=12, height=HEIGHT, width=WIDTH, seed=5, n_test=1)
    return root / "train"


@pytest.fixture(scope="module")
def checkpoint(jt, train_root, tmp_path_factory):
    """A short run through the command line; returns (checkpoint path, training set)."""
    import train
    from datasets import TrainingSet

    run = tmp_path_factory.mktemp("ckpt") / "run"
    status = train.main(["segmenter", "--data", str(train_root), "--output_path", str(run), "--height", str(HEIGHT),
                         "--width", str(WIDTH), "--max_steps", "6", "--batch_size", "8", "--widths", WIDTHS, "--cpu"])
    assert status == 0
    return run / "checkpoints" / "last.safetensors", TrainingSet(train_root, HEIGHT, WIDTH)


def test_training_loss_falls_quickly(jt, train_root):
    from datasets import NUM_CLASSES, TrainingSet
    from scoring.segmenter import SegmenterConfig
    from scoring.segmenter_training import SegmenterTask, SegmenterTrainConfig

    config = SegmenterConfig(widths=(16, 32, 64), height=HEIGHT, width=WIDTH)
    task = SegmenterTask(TrainingSet(train_root, HEIGHT, WIDTH), config,
                         SegmenterTrainConfig(batch_size=8, lr=5e-3, max_steps=60))
    losses = [task.step(step)["loss"] for step in range(60)]
    first, last = losses[0], np.mean(losses[-3:])
    assert first > 0.5 * np.log(NUM_CLASSES)            # starts near chance
    assert last < 0.6 * first


@pytest.mark.slow
def test_segmenter_learns_the_synthetic_set(jt, train_root, tmp_path):
    import train
    from datasets import TrainingSet
    from scoring.segmenter import load_segmenter, mask_accuracy

    assert train.main(["segmenter", "--data", str(train_root), "--output_path", str(tmp_path / "run"), "--height",
                       str(HEIGHT), "--width", str(WIDTH), "--max_steps", "400", "--batch_size", "8",
                       "--lr", "5e-3", "--widths", WIDTHS, "--cpu"]) == 0
    path = tmp_path / "run" / "checkpoints" / "last.safetensors"
    dataset = TrainingSet(train_root, HEIGHT, WIDTH)
    model = load_segmenter(path)
    accuracy = np.mean([mask_accuracy(model, dataset[i].image, dataset[i].label) for i in range(len(dataset))])
    assert accuracy > 0.9


def test_checkpoint_describes_itself_and_reloads_to_the_same_predictions(jt, checkpoint):
    from weights.checkpoint import read_checkpoint
    from scoring.segmenter import SegmenterConfig, load_segmenter, predict_labels

    path, dataset = checkpoint
    _, info = read_checkpoint(path)
    assert info["kind"] == "segmenter-train" and info["extra"]["step"] == 6
    expected = SegmenterConfig(widths=(16, 32, 64), height=HEIGHT, width=WIDTH)
    assert SegmenterConfig.from_dict(info["config"]["network"]) == expected
    images = np.stack([dataset[i].image for i in range(2)])
    first, second = load_segmenter(path), load_segmenter(path)
    np.testing.assert_array_equal(predict_labels(first, images), predict_labels(second, images))


def test_any_input_size_gives_logits_of_that_size(jt):
    from scoring.segmenter import Segmenter, SegmenterConfig, to_input

    model = Segmenter(SegmenterConfig(widths=(4, 8, 8), num_classes=5, height=13, width=19))
    model.eval()
    image = np.random.default_rng(0).integers(0, 256, (2, 13, 19, 3), dtype=np.uint8)
    assert tuple(model(to_input(image)).shape) == (2, 5, 13, 19)


def test_mask_accuracy_is_pixel_accuracy_at_the_label_size(jt, monkeypatch):
    from scoring import segmenter

    model = segmenter.Segmenter(segmenter.SegmenterConfig(widths=(4,), height=4, width=6))
    seen = {}

    def fake_predict(model, images):
        seen["shape"] = images.shape
        return np.tile(np.array([0, 0, 1, 1, 2, 2], np.uint8), (1, 4, 1))    # [1, 4, 6]

    monkeypatch.setattr(segmenter, "predict_labels", fake_predict)
    label = np.repeat(np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2], np.uint8)[None], 8, 0)   # 8 x 12
    image = np.zeros((16, 20, 3), np.uint8)
    accuracy = segmenter.mask_accuracy(model, image, label)
    assert seen["shape"] == (1, 4, 6, 3)                      # resized to the model's size first
    upsampled = np.repeat(np.array([0, 0, 1, 1, 2, 2]), 2)     # nearest, 6 -> 12 columns
    assert accuracy == pytest.approx(np.mean(upsampled == label[0]))
    with pytest.raises(ValueError, match="differ in size"):
        segmenter.pixel_accuracy(np.zeros((2, 3)), np.zeros((3, 2)))


def test_loading_refuses_another_kind_of_checkpoint(jt, tmp_path):
    from weights.checkpoint import WeightsError, save_checkpoint
    from scoring.segmenter import load_segmenter

    save_checkpoint(tmp_path / "x.safetensors", {"w": np.zeros(2, np.float32)}, "vqmodel", {"network": {}})
    with pytest.raises(WeightsError, match="'vqmodel' checkpoint"):
        load_segmenter(tmp_path / "x.safetensors")


def test_training_cli_reports_a_bad_root(jt, tmp_path, capsys):
    import train

    (tmp_path / "empty").mkdir()
    status = train.main(["segmenter", "--data", str(tmp_path / "empty"), "--output_path", str(tmp_path / "s"), "--cpu"])
    assert status == 1
    assert "empty/imgs: folder not found" in capsys.readouterr().err
    assert not (tmp_path / "s" / "checkpoints").exists()
    with pytest.raises(SystemExit):
        train.main(["segmenter", "--data", str(tmp_path / "nowhere"), "--output_path", str(tmp_path / "s"), "--cpu"])
    assert "--data" in capsys.readouterr().err


def test_a_skipped_step_leaves_the_batchnorm_statistics_alone(jt, train_root, monkeypatch):
    """A NaN loss skips the step; its forward pass had moved the running statistics, which are put
    back, so the network is exactly as before (a taken step does move them)."""
    from jittor import nn

    from datasets import TrainingSet
    from scoring.segmenter import SegmenterConfig
    from scoring.segmenter_training import SegmenterTask, SegmenterTrainConfig
    from weights.checkpoint import module_arrays

    config = SegmenterConfig(widths=tuple(int(w) for w in WIDTHS.split(",")), height=HEIGHT, width=WIDTH)
    task = SegmenterTask(TrainingSet(train_root, HEIGHT, WIDTH), config, SegmenterTrainConfig(batch_size=4, max_steps=10))
    assert "skipped" not in task.checked_step(0)
    before = module_arrays(task.model)
    real = nn.cross_entropy_loss
    monkeypatch.setattr(nn, "cross_entropy_loss", lambda *args, **kw: real(*args, **kw) * float("nan"))
    assert task.checked_step(1)["skipped"] == "non_finite"
    after = module_arrays(task.model)
    assert [k for k in before if not np.array_equal(before[k], after[k])] == []
    monkeypatch.setattr(nn, "cross_entropy_loss", real)
    assert "skipped" not in task.checked_step(1)
    moved = [k for k, v in module_arrays(task.model).items() if not np.array_equal(before[k], v)]
    assert any("running_mean" in k for k in moved) and any("running_mean" not in k for k in moved)


def test_resuming_refuses_another_architecture_or_size(jt, checkpoint, tmp_path, capsys, caplog):
    """Another --widths/--height is refused (exit 2); a longer --max_steps is allowed, with a warning
    that the cosine learning rate now runs to the new end (not the run a longer start makes)."""
    import shutil

    import train

    run = tmp_path / "run"
    shutil.copytree(checkpoint[0].parent.parent, run)
    resume = ["segmenter", "--resume", "--output_path", str(run), "--max_steps", "7", "--cpu"]
    for bad, message in ((["--widths", "8,16"], "trained with --widths 16,32,64"),
                         (["--height", "48"], f"trained with --height {HEIGHT}")):
        with pytest.raises(SystemExit) as exit_:
            train.main(resume + bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    with caplog.at_level("WARNING"):
        assert train.main(resume) == 0
    assert "the learning rate's cosine runs over --max_steps" in caplog.text
