"""Benchmarks: one module per `sd35 bench …` command (results belong in docs/benchmarks.md), `sd35 fidelity`
(FP8 vs bf16, per block), and `sd35 bench report`, which puts them on one page (report: run or read; charts:
the PNGs, shared with notebook 03; html: the page; quality: the image grid; perceptual: LPIPS)."""
