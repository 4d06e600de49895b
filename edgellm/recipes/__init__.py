"""Recipes: a configuration, a prompt template and a schema over the running service.

A recipe is one more client of `edgellm serve` (it sends ordinary requests over MQTT), so it
shares the service's engine and queue and adds no generation logic of its own.
"""
from __future__ import annotations

RECIPES = ("anomaly",)
