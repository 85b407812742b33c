"""The text pipeline: tokenizer, incremental detokenizer, stop strings and the stream chunks they make."""
