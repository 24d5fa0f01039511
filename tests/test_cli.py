"""`vitq` command line: bad configurations fail fast with a clear message and exit code 2; the
quantize -> eval -> export -> run chain works on the real default model (no reconstruction, few images,
so it stays in CI time)."""
import json

import pytest

from vitq import cli


@pytest.mark.parametrize("argv,needle", [
    (["quantize", "--w-bits", "0"], "w_bits"),
    (["quantize", "--a-bits", "9"], "a_bits"),
    (["quantize", "--model", "not_a_timm_model", "--no-amo"], "not_a_timm_model"),
    (["quantize", "--data", "/nonexistent/images", "--no-amo"], "/nonexistent/images"),
    (["eval", "--quantized", "/nonexistent/run"], "quant_config.json"),
    (["export", "--quantized", "/nonexistent/run", "--out", "/tmp/vitq_never_written"], "/nonexistent/run"),
    (["run", "--artifact", "/nonexistent/artifact"], "/nonexistent/artifact"),
])
def test_bad_arguments_exit_2_with_message(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vitq {argv[0]}: error:"), err
    assert needle in err, err


def test_quantize_eval_export_run_chain(tmp_path, capsys):
    run = tmp_path / "w8a8"
    common = ["--data", "fashion-mnist", "--eval-images", "24", "--quiet"]
    assert cli.main(["quantize", "--w-bits", "8", "--a-bits", "8", "--no-amo", "--calib-images", "8",
                     "--out", str(run)] + common) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["eval"]["n"] == 24
    assert 0.0 <= report["eval"]["top1"] <= 100.0 and report["eval"]["agreement"] >= 80.0, report["eval"]
    assert (run / "model.safetensors").is_file() and (run / "quant_config.json").is_file()

    # eval of the saved model reproduces the numbers quantize reported
    ev_path = tmp_path / "eval.json"
    assert cli.main(["eval", "--quantized", str(run), "--out", str(ev_path)] + common) == 0
    ev = json.loads(ev_path.read_text())["eval"]
    assert ev["top1"] == report["eval"]["top1"] and ev["agreement"] == report["eval"]["agreement"]

    art = tmp_path / "artifact"
    assert cli.main(["export", "--quantized", str(run), "--out", str(art)]) == 0
    assert (art / "config.json").is_file()
    capsys.readouterr()
    assert cli.main(["run", "--artifact", str(art), "--n", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("predicted") == 4 and "torch.ops.vitq kernels on cpu" in out


def test_demo_runs_end_to_end_on_the_kernels(tmp_path, capsys):
    # the README's main job, shortened (8 calibration images, 2 iterations, 16 test images):
    # every stage runs, the table and plot are written, and the kernels reproduce the fake-quant model
    assert cli.main(["demo", "--out", str(tmp_path), "--n-test", "16", "--n-calib", "8", "--iters", "2", "--quiet"]) == 0
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert summary["n_test"] == 16 and summary["kernels"] == "C++ CPU kernels"
    assert summary["kernel_vs_fakequant_agreement"] == 100.0
    assert summary["min_feature_cosine_kernel_vs_fakequant"] >= 0.9999
    assert summary["sizes"]["matmul_weight_ratio"] > 3.5
    table = (tmp_path / "demo.md").read_text()
    assert "vitq kernels W4A4" in table and "fake-quant W4A4" in table
    png = (tmp_path / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "kernel vs fake-quant: top-1 agreement 100.00%" in capsys.readouterr().out


class _Stop(Exception):
    pass


def test_calib_seed_sets_the_draw_alone(monkeypatch):
    """--calib-seed changes which calibration images are drawn, and nothing else: the config's
    seed (QDrop masks, batch order) stays --seed.  The same holds for bench/accuracy.py."""
    import sys
    from pathlib import Path
    seen = {}

    def spy_build_data(spec, model, calib_images, eval_images, seed=0):
        seen["draw"] = seed
        raise _Stop

    def spy_config(args):
        cfg = orig_config(args)
        seen["config"] = cfg.seed
        return cfg
    orig_config = cli._config_from_args
    monkeypatch.setattr(cli, "_config_from_args", spy_config)
    monkeypatch.setattr(cli, "build_data", spy_build_data)
    for argv, want in ((["--seed", "2"], (2, 2)), (["--seed", "2", "--calib-seed", "5"], (5, 2)),
                       (["--calib-seed", "5"], (5, 0))):
        seen.clear()
        with pytest.raises(_Stop):
            cli.main(["quantize", "--no-amo", "--quiet"] + argv)
        assert (seen["draw"], seen["config"]) == want, argv

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import accuracy
    finally:
        sys.path.pop(0)

    def spy_batch(ds, n, seed):
        seen["bench_draw"] = seed
        raise _Stop
    monkeypatch.setattr(accuracy.data, "calibration_batch", spy_batch)
    with pytest.raises(_Stop):
        accuracy.main(["--bits", "8", "--rows", "all", "--seed", "1", "--calib-seed", "4", "--quiet"])
    assert seen["bench_draw"] == 4
    args = type("A", (), dict(preset="fast", iters=None, calib_images=None, batch_size=None, eval_images=300,
                              seed=1, calib_seed=4))()
    assert accuracy.cli_command("all", 4, args).endswith("--eval-images 300 --seed 1 --calib-seed 4")
    args.calib_seed = None
    assert accuracy.cli_command("all", 4, args).endswith("--eval-images 300 --seed 1")
