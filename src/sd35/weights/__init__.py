"""Weights: where a model's files come from and how they become a pipeline (hub, tiny, local folders, the
FP8 store, SAI/ComfyUI single files, lean loading, sizing from configs). Nothing here generates."""
