"""Image tokenizers: conv autoencoders + quantizers, behind one `Tokenizer` facade."""
