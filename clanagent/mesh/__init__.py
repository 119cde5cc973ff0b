"""mesh: not built yet (see the issues); the package exists so every part has one home."""
