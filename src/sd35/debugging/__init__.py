"""Debugging: SD35_BREAK (stops inside the MMDiT and the scheduler, the NaN watch), tensor summaries for the
Variables pane, what to do at a stop (`sd35_dump`, `compare_bf16`), attaching VS Code, attention maps."""
