"""sd35: load, generate, serve, debug and benchmark Stable Diffusion 3.5 in bf16 or FP8.

Data flows one way: settings -> hardware + precision -> model source -> loaded pipeline ->
generation -> CLI | service | notebook.
"""

__version__ = "0.1.0"
