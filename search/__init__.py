"""Headless CMA-ES search for Calibri scales (ask/tell loop, image rewards)."""
