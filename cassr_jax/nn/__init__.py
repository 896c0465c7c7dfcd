"""Shared neural-network building pieces: layers with logical axis names, attention."""
