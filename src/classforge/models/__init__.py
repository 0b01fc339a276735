"""Backbones by name: `registry` creates them; each other module here is one family of backbones and registers
it when imported, which the registry does on first use (see `registry._families`)."""
