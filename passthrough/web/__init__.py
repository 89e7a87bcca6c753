"""Flask blueprints, one per concern: downloads, health, and the error mapping."""
