"""Evaluation.

image_metrics   PSNR and SSIM per image (batched torch)
codebook        codebook usage, entropy and perplexity over a whole set, per scale
inception       torch-fidelity's Inception-v3 port, weights from a local file or the torch hub cache
image_sources   ADM .npz batches (streamed) and image folders as uint8 batches
fid             FID, Inception Score, precision/recall; reference statistics and their cache
tokenizer_eval  `vqtok reconstruct` and `vqtok eval-tokenizer`
progress        progress bars / log lines for evaluation passes
"""
