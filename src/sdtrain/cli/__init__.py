"""Command-line interface: thin Typer commands (parse, load config, call run/tools, render)."""
