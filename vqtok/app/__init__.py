"""The application layer: what a command does end to end, between the CLI and the library.

`sample` (labels, output directory, npz, torchrun ranks) and `encode` (shards dealt to ranks, resumable
output, manifest). Each takes one options object built by the CLI; nothing here parses arguments, and
nothing below this layer imports it.
"""
