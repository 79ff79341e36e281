"""Networks, one architecture per file (see docs/ARCHITECTURE.md for the network contract)."""
