"""The command groups of the CLI. Adding a group = one module exposing `app` + one line here.

Group modules import only typer/stdlib at top level; heavy work is imported inside commands.
"""

from __future__ import annotations

import importlib

import typer

from sdtrain.methods.registry import METHODS  # stdlib-only: the method names

# (group name, module, help)
GROUPS: list[tuple[str, str, str]] = [
    ("caption", "sdtrain.cli.caption", "Caption or tag images (BLIP, WD14)."),
    ("metadata", "sdtrain.cli.metadata", "Build and clean fine-tune metadata JSON."),
    ("dataset", "sdtrain.cli.dataset", "Inspect datasets before training."),
    ("latents", "sdtrain.cli.latents", "Pre-encode training latents (VAE) to disk."),
    ("generate", "sdtrain.cli.generate", "Generate images from a model, LoRAs and embeddings."),
    ("model", "sdtrain.cli.model", "Inspect and convert model files."),
    ("config", "sdtrain.cli.config_import", "Read configs users already have (import)."),
    ("train", "sdtrain.cli.train", "Train a model (" + ", ".join(METHODS) + ")."),
]


def lazy(module_path: str) -> typer.Typer:
    """Import a group module and return its Typer app, with plain help (see PLAIN_HELP)."""
    app = importlib.import_module(module_path).app
    app.rich_markup_mode = PLAIN_HELP
    return app


# Help is click's plain layout, not typer's rich panels: at 80 columns the panels cut option names
# and defaults with "…", show a `<bool>` metavar on flags, and read `[model]` in a help text as
# markup (it vanished). The plain layout prints every name whole, wraps only the help text, and
# is greppable.
PLAIN_HELP = None
