"""One option convention for every entry point: underscores (``--batch_size``), the hyphenated
spelling accepted as well."""

import ast
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = sorted(
    [p for p in REPO.glob("*.py") if p.name not in ("cli.py", "jittor_env.py")]
    + list((REPO / "tools").glob("*.py")) + list((REPO / "bench").glob("*.py"))
    + [REPO / "datasets" / "synthetic.py", REPO / "scoring" / "segmenter_training.py"])


def options_of(path: Path) -> list[str]:
    """Every ``--name`` given to an ``add_argument`` call in the file's source."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found += [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
    return found


def parsers_of(path: Path) -> list[str]:
    """How the file builds its parsers: ``cli.ArgumentParser`` or ``argparse.ArgumentParser``."""
    return [ast.unparse(node.func) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("ArgumentParser")]


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: str(p.relative_to(REPO)))
def test_options_are_spelled_with_underscores_on_the_shared_parser(path):
    hyphenated = [o for o in options_of(path) if "-" in o[2:]]
    assert not hyphenated, f"{path.name}: options spelled with hyphens: {hyphenated}"
    plain = [p for p in parsers_of(path) if p != "cli.ArgumentParser"]
    assert not plain, f"{path.name}: parsers not built with cli.ArgumentParser: {plain}"


def test_the_scan_sees_a_hyphenated_option(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('import argparse\np = argparse.ArgumentParser()\np.add_argument("--batch-size")\n')
    assert options_of(bad) == ["--batch-size"] and parsers_of(bad) == ["argparse.ArgumentParser"]


def test_hyphenated_spellings_are_accepted():
    from tools.convert_weights import build_parser

    args = build_parser().parse_args(["in.pt", "out.safetensors", "--latent-scale", "0.5", "--kind", "unet"])
    assert args.latent_scale == 0.5


DEVICE_OPTIONS = ("--cuda", "--device", "--gpu")


def visible_device_options(path: Path) -> list[str]:
    """``add_argument`` calls in the file that name the device otherwise than jittor_env's ``--cpu``
    and show in --help (a hidden one keeps an earlier version's spelling working)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and a.value in DEVICE_OPTIONS]
            hidden = any(k.arg == "help" and ast.unparse(k.value) == "argparse.SUPPRESS" for k in node.keywords)
            found += [] if hidden else names
    return found


@pytest.mark.parametrize("path", ENTRY_POINTS, ids=lambda p: str(p.relative_to(REPO)))
def test_the_device_is_chosen_with_cpu_everywhere(path):
    assert not visible_device_options(path), f"{path.name}: {visible_device_options(path)}; use jittor_env's --cpu"


def test_the_benches_earlier_device_spellings_are_still_accepted():
    from bench import bench_autoencoder, bench_grad_checkpoint

    parse = bench_grad_checkpoint.build_parser().parse_args
    assert (parse([]).cpu, parse(["--cpu"]).cpu, parse(["--cuda"]).cpu, parse(["--cpu", "--cuda"]).cpu) == (
        False, True, False, False)
    parse = bench_autoencoder.build_parser().parse_args
    assert (parse([]).cpu, parse([]).device, parse(["--cpu"]).cpu) == (False, "all", True)
    assert parse(["--device", "cpu"]).device == "cpu"
    for usage in (bench_autoencoder.build_parser().format_usage(), bench_grad_checkpoint.build_parser().format_usage()):
        assert "--cpu" in usage and "--device" not in usage and "--cuda" not in usage
