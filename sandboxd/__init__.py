"""sandboxd: run untrusted Python, TypeScript and Rust in throw-away sandboxes."""

__version__ = "0.1.0"
