"""Self-contained model code: copied into every saved checkpoint, so it imports only itself, torch and transformers."""
