"""Ride matching: a matcher group grown while it runs, up to (and past) the partition count."""
