"""Shared by every service: settings, the job model, Redis keys and the job client."""
