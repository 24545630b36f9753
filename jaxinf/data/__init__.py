"""Data that ships inside packages: scikit-learn's digits (and, later, the stdlib source corpus)."""
