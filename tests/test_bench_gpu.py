"""`sd35 bench gpu` (`make gpu-check`): without CUDA it refuses with the reason; `--rehearse` runs the same
sequence on the CPU (tiny architecture, emulated fp8), so the GPU acceptance script cannot rot."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path; this machine has a GPU")


@no_cuda
def test_without_cuda_it_refuses_and_names_the_rehearsal():
    r = run_cli("bench", "gpu", "--json")
    assert r.returncode == 2 and "--rehearse" in r.stderr and "Traceback" not in r.stderr, r.stderr


@no_cuda
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_rehearsal_runs_the_whole_sequence_with_emulated_fp8(tiny_cache):
    r = run_cli("bench", "gpu", "--rehearse", "--json", env={"SD35_CACHE_DIR": str(tiny_cache)}, timeout=1500)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["rehearsal"] is True and report["emulated"] is True and report["arch"] == "tiny"
    assert "not GPU figures" in report["note"]
    assert report["tests"]["ran"] and report["tests"]["passed"], report["tests"]
    assert set(report["modes"]) == {"bf16", "fp8-weight", "fp8"} and report["compile_shapes"] == "static (CPU rehearsal)"
    assert report["modes"]["fp8"]["emulated"] is True and report["modes"]["bf16"]["emulated"] is False
    for row in report["modes"].values():
        assert row["eager_step_ms"] > 0 and row["compiled_step_ms"] > 0
        assert row["compile_cold_s"] > 0 and row["compile_warm_s"] > 0
    pipe = report["pipeline"]  # the full pipeline (both CLIPs, T5, MMDiT, VAE) in fp8, one 2-step CFG generation
    assert (pipe["arch"], pipe["size"], pipe["mode"], pipe["kind"]) == ("tiny", 128, "fp8", "process_max_rss")
    assert pipe["emulated"] is True and pipe["finite"] is True
    assert pipe["quantized"] == ["transformer: fp8 (emulated)", "text_encoder_3 (T5): fp8-weight"]
    assert 0 < pipe["weights_bytes"] < pipe["loaded_bytes"] <= pipe["peak_bytes"] and pipe["seconds"] > 0
    errors = report["fp8_vs_bf16"]
    assert len(errors["blocks"]) == 4 and 0 < errors["max_block_rel_err"] < 0.2 and errors["output_cosine"] > 0.99
    image = errors["image"]  # the final image of the full pipeline, fp8 vs bf16 (42.3 dB measured on tiny)
    assert (image["arch"], image["steps"], image["emulated"]) == ("tiny", 4, True)
    assert 30 <= image["psnr_db"] < 100 and 0 < image["rel_err"] < 0.1, image  # close, and not the same image
    from sd35.bench.gpu import markdown

    table = markdown(report)  # what `sd35 bench gpu` prints without --json, for docs/benchmarks.md
    assert "| fp8 (emulated) |" in table and "rehearsal" in table
    assert "full pipeline, fp8 (tiny, 128²" in table and "process peak RSS" in table
    assert "final image (tiny, 128², 4 steps" in table and f"PSNR {image['psnr_db']} dB" in table
