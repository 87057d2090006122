"""Composition root: config -> plan -> bundle -> method -> engine. Called by the CLI only."""
