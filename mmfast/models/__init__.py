"""Model adapters: everything family-specific lives here."""
