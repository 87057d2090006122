"""Model layer: load, convert and save SD 1.x/2.x bundles; text encoding; family facts."""
