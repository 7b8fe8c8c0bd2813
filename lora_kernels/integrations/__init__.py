"""Integrations with serving engines and libraries; each module imports its library lazily."""
