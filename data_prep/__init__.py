"""Data prep: default corpus, SentencePiece tokenizer training, corpus -> megatron-core shards."""
