"""Task data: jsonl formats, tokenisation."""
