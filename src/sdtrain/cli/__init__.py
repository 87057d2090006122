"""Command-line interface: thin Typer commands that parse, load config, call run/tools and render."""
