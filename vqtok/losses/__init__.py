"""Tokenizer training losses: LPIPS, discriminators, GAN terms and the weighted total."""
