"""Self-contained model code: copied into every saved checkpoint (see ARCHITECTURE §2)."""
