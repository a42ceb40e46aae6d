"""Chime's training side: datasets, recipes, training and evaluation."""
