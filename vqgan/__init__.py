"""The `vqgan` console script. Nothing in the library imports this package."""
