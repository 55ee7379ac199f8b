"""Payment pipeline: fraud check, ledger, balance and notification as stage processes."""
