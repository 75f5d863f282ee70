"""The encoder: N stacked blocks over a padded batch, with a source padding mask."""
