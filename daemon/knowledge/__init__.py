"""The knowledge base: its files (Markdown and CSV, what a sales team edits), their import
into PostgreSQL, and its search (full-text, by meaning when an embeddings endpoint is set,
and both fused)."""
