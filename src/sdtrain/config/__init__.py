"""Configuration: run TOML + CLI flags -> validated pydantic sections (no torch imports here)."""
