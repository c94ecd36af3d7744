"""The RAR autoregressive generator: model, scan orders and annealing, sampling, checkpoints."""

from vqtok.ar.rar import RAR, RARConfig, ar_loss

__all__ = ["RAR", "RARConfig", "ar_loss"]
