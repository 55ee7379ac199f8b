"""Sessions across instances: sticky routing, a shared store, tokens, and the gateway."""
