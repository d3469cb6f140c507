"""pneumoscan: pneumonia screening on chest X-rays, trained from scratch, run in the browser."""

__version__ = "0.1.0"
