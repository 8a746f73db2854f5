"""Importers: image stacks (TIFF/PNG sections) into volumes, synapse tables into the DB."""
