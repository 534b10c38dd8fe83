"""Preprocessing stages that turn raw videos into GT-Pairs and pre-encoded shards."""
