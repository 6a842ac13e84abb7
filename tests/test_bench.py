"""``anyseg bench`` pieces that run on a CPU: batched-encoder rows, config selection, failure handling."""
import platform

import pytest
import torch

from anyseg.fast.benchmark import run_benchmark, speed_configs


def test_batched_encoder_rows_report_per_image_time():
    out = run_benchmark(tasks=["encode_vit_t"], quick=True, devices=["cpu"], encode_batch=2,
                        only_configs=["lossless"], log=lambda s: None)
    (result,) = out["results"]
    (row,) = result["rows"]
    assert row["task"] == "encode_vit_t_batch2" and row["config"] == "lossless"
    assert row["per_image_ms"] == pytest.approx(1000 * row["wall"] / 2)
    assert row["throughput"] == pytest.approx(2 / row["wall"])
    assert "ms/img" in result["markdown"] and "page faults" in result["markdown"]
    if platform.system() != "Windows":  # minor page faults of the timed repeat, counted by getrusage
        assert isinstance(row["faults"], int) and row["faults"] >= 0
    if platform.libc_ver()[0] == "glibc":  # lossless sets the allocator before the first row, for all rows
        assert result["meta"]["machine"].endswith("glibc allocator keeps freed memory (all rows)")


def test_unknown_config_names_are_refused():
    with pytest.raises(ValueError, match="unknown config.*turbo.*expected some of faithful"):
        run_benchmark(tasks=["click"], devices=["cpu"], only_configs=["turbo"], log=lambda s: None)


def test_a_failing_task_is_reported_and_the_others_still_run():
    logs = []
    out = run_benchmark(tasks=["amg", "click"], quick=True, devices=["cpu"], amg_model="no_such_model",
                        only_configs=["lossless"], log=logs.append)
    (result,) = out["results"]
    assert [r["task"] for r in result["rows"]] == ["click"]
    (failure,) = result["meta"]["failures"]
    assert failure["task"] == "amg" and "no_such_model" in failure["error"]
    assert "**amg failed**" in result["markdown"]
    assert any("FAILED" in line for line in logs)



def test_decoder_ab_loads_a_revision_beside_the_working_tree():
    """benchmarks/bench_decoder_ab.py loads anyseg/fast/decoder.py as committed at a revision as its own
    module; for HEAD it decodes like the installed one."""
    import importlib.util
    import subprocess
    from pathlib import Path

    from anyseg.config import MaskDecoderConfig
    from anyseg.fast.decoder import FastDecoder
    from anyseg.modeling.mask_decoder import MaskDecoder

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode != 0:
        pytest.skip("needs the repository's git history (not a git checkout)")
    spec = importlib.util.spec_from_file_location("bench_decoder_ab", root / "benchmarks" / "bench_decoder_ab.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = bench.load_decoder_at("HEAD")
    assert base.FastDecoder is not FastDecoder and base.__package__ == "anyseg.fast"
    torch.manual_seed(3)
    dec = MaskDecoder(MaskDecoderConfig()).eval()
    emb, pe, no_mask, sparse = torch.randn(1, 256, 8, 8), torch.randn(1, 256, 8, 8), torch.randn(1, 256), torch.randn(2, 2, 256)
    with torch.inference_mode():
        want = FastDecoder(dec, pe, no_mask)(sparse, None, True, embedding=emb)
        got = base.FastDecoder(dec, pe, no_mask)(sparse, None, True, embedding=emb)
    assert torch.allclose(got[0], want[0], atol=1e-4) and torch.allclose(got[1], want[1], atol=1e-5)
    with pytest.raises(subprocess.CalledProcessError):
        bench.load_decoder_at("no-such-revision")
