"""The one training engine: loop, noise/loss recipe, optimizers, schedules, states, saving."""
