"""Data that ships inside packages: scikit-learn's digits, the stdlib source corpus, procedural
arithmetic, and the byte tokenizer that reads text."""
