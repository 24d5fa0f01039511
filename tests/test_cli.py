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
