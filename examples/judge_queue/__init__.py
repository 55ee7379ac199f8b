"""Submission evaluation queue: an HTTP endpoint enqueues, competing judges run programs."""
