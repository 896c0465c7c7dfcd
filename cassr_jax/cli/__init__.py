"""Command-line entry points (cassr-train, cassr-infer, cassr-eval, cassr-convert): thin layers over the library."""
