"""The operations tools behind `sdrctl bench`, `profile`, `replay`, `report`, `tune`, `chat`
and `migrate --verify`: they drive or read the pipeline in `daemon/`, which never imports
them."""
